"""The Numba backend: JIT-compiled kernels on GGUF block bytes.

* ``matmul``: the backend's public entry (``SUPPORTED``, ``matmul_into``), registered as "numba"
  in ``kernels/backends.py``; it dispatches to
* ``kquants`` (Q2_K..Q6_K) and ``legacy`` (32-element and float types, plus the LLVM-IR helpers);
* ``quantize``: the weight quantizer cores behind ``kernels/quantize_weights.py``.

Nothing is imported here, so importing the package compiles nothing. (The name shadows nothing:
the modules here import the Numba library absolutely, ``import numba``, which Python 3 resolves
to the top-level package, never to this one.)
"""
