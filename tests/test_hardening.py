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


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(repeat_penalty=float("nan")), "repeat_penalty must be a finite number"),
    (dict(seed=-5), "seed must be an integer"),
    (dict(repeat_last_n=-2), "repeat_last_n must be >= -1"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(stop=[""]), "stop strings must be non-empty"),
])
def test_bad_generation_arguments_are_named(demo_model, kwargs, match):
    """These used to run silently (NaN logits, every token penalised, an immediate stop) or fail
    deep inside NumPy."""
    with Engine.load(demo_model) as eng:
        with pytest.raises(ValueError, match=match):
            eng.generate("Hello", **{"max_new_tokens": 4, **kwargs})


@pytest.mark.parametrize("prompt,error,match", [
    (None, TypeError, "a string or a sequence of token ids"),
    ([1.5, 2.0], ValueError, "token ids must be integers"),
    ([1, 10**9], ValueError, "token ids must be integers"),
])
def test_bad_prompts_are_named(demo_model, prompt, error, match):
    with Engine.load(demo_model) as eng:
        with pytest.raises(error, match=match):
            eng.generate(prompt, 4)


def test_seed_minus_one_is_random_and_repeat_last_n_zero_is_off(demo_model):
    """llama.cpp's meanings: seed -1 draws a seed; repeat_last_n 0 turns the penalty off (it used
    to penalise the whole history)."""
    from weightstream.engine.runtime.sampling import Sampler, SamplingParams

    assert SamplingParams(seed=-1).seed is None
    logits = np.array([3.0, 2.0, 1.0], np.float32)
    off = Sampler(SamplingParams(repeat_penalty=10.0, repeat_last_n=0))
    assert off(logits, [0, 0, 0]) == 0  # not penalised: token 0 still wins
    on = Sampler(SamplingParams(repeat_penalty=10.0, repeat_last_n=-1))
    assert on(logits, [0, 0, 0]) == 1


def test_perplexity_needs_a_context_of_two(demo_model):
    with Engine.load(demo_model) as eng:
        for n_ctx in (0, 1):
            with pytest.raises(ValueError, match="n_ctx must be an integer >= 2"):
                eng.perplexity("some text " * 50, n_ctx=n_ctx)


@pytest.mark.parametrize("key,value,match", [
    ("llama.attention.head_count", 0, "llama.attention.head_count: expected an integer >= 1, found 0"),
    ("tokenizer.ggml.tokens", list(range(256)), "tokenizer.ggml.tokens: expected an array of strings"),
    ("tokenizer.chat_template", 7, "tokenizer.chat_template: expected a string"),
])
def test_the_cli_names_a_poisoned_file_and_key_without_a_traceback(tmp_path, key, value, match):
    """head_count 0 raised ZeroDivisionError, u32 tokens and a non-string chat template raw
    errors, each printed by the CLI as a traceback."""
    from tests.test_model_validation import loadable_metadata, write

    path = write(tmp_path, metadata=loadable_metadata(**{key: value}))
    rc, out, err = cli("run", path, "-p", "hi", "-n", "2")
    assert rc != 0 and match in err and str(path) in err and "Traceback" not in err
