"""NumPy's BLAS kept to the calling thread while our kernels run.

Our kernels thread with OpenMP; NumPy's BLAS (OpenBLAS) has its own pool, whose threads spin for a
while after each call, as OpenMP's do. A forward pass alternates the two (an F32 router or head
through np.matmul, then a fused kernel), and on a 2-core machine each pool's spinning threads then
take the cores the other pool needs: a Qwen3.5-35B-A3B decode step took 650 ms with OpenBLAS on 2
threads and 176 ms with it on 1 (Intel Xeon, 2 cores, 2026-12-06). So the model runs its NumPy
matmuls single-threaded, inside `one_blas_thread()`; the process's own BLAS setting is restored on
exit, so a caller's NumPy code is not affected. `blas_threads(n)` is the same limit at n threads:
the kernel benchmarks pin BLAS to the thread count they measure, so that a "1 thread" figure of a
path ending in NumPy does not quietly use every core.
"""
from __future__ import annotations

import contextlib
import functools


@functools.lru_cache(maxsize=None)
def _blas_pools():
    """threadpoolctl's handle on the BLAS libraries loaded in this process (None: no threadpoolctl)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # a dependency in pyproject.toml; without it, nothing is limited
        return None
    return ThreadpoolController().select(user_api="blas")


def blas_threads(n: int | None):
    """A context manager: BLAS calls inside it use at most n threads (None: no limit); about 20 us
    to enter and leave."""
    pools = _blas_pools() if n else None
    return pools.limit(limits=int(n)) if pools else contextlib.nullcontext()


def one_blas_thread():
    """blas_threads(1): what Model.forward runs inside."""
    return blas_threads(1)
