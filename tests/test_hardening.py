"""Misuse that used to crash the process (issue 16): it now raises a clear error instead."""
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT

import weightstream.kernels as kernels
from tests.test_cli import cli
from weightstream.engine import Engine


@pytest.mark.parametrize("threads", [0, -1, 100000, 2.5, True, "2"])
def test_kernel_thread_counts_outside_1_to_512_are_refused(threads):
    """OpenMP crashed (segfault, or 'libgomp: Thread creation failed') on 100000 threads."""
    w = np.zeros((4, 32), np.float32)
    qt = kernels.QTensor(QT.F32, (4, 32), w.view(np.uint8).reshape(4, -1))
    with pytest.raises(ValueError, match=r"threads must be an integer in 1\.\.512"):
        kernels.dequantize(qt, threads=threads)
    with pytest.raises(ValueError, match=r"threads must be an integer in 1\.\.512"):
        kernels.matmul(np.ones((1, 32), np.float32), qt, threads=threads, backend="numpy")


def test_engine_and_cli_refuse_a_huge_thread_count(demo_model):
    with pytest.raises(ValueError, match="Engine.load: threads"):
        Engine.load(demo_model, threads=100000)
    rc, out, err = cli("run", demo_model, "-p", "hi", "-n", "2", "-t", "100000")
    assert rc != 0 and "threads must be an integer" in err and "Traceback" not in err


def test_a_generator_resumed_after_close_raises_instead_of_crashing(demo_model):
    """Resuming stream() after close() read unmapped weights: exit 139."""
    eng = Engine.load(demo_model)
    tokens = eng.generate_tokens("The capital of France is", 8)
    next(tokens)
    eng.close()
    with pytest.raises(RuntimeError, match="closed"):
        next(tokens)
    with Engine.load(demo_model) as eng:
        pieces = eng.stream("Once upon a time", 8)
        next(pieces)
    with pytest.raises(RuntimeError, match="closed"):
        list(pieces)


def test_two_threads_generating_on_one_engine_take_turns(demo_model):
    """They used to interleave their states and each other's text (a streamed MoE even raised
    KeyError): each thread now gets exactly the text it gets alone."""
    import threading

    prompts = ["The capital of France is", "Water boils at"]
    with Engine.load(demo_model) as eng:
        alone = [eng.generate(p, 12) for p in prompts]
        results = [None, None]

        def run(i):
            results[i] = eng.generate(prompts[i], 12)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert results == alone


def test_a_generator_superseded_by_a_newer_evaluation_stops_with_an_error(demo_model):
    with Engine.load(demo_model) as eng:
        first = eng.generate_tokens("The capital of France is", 8)
        next(first)
        eng.logits([1, 2, 3])  # a new sequence from position 0, on the same thread
        with pytest.raises(RuntimeError, match="superseded"):
            next(first)
        assert len(list(eng.generate_tokens("Hello", 4))) > 0  # the engine itself is fine
