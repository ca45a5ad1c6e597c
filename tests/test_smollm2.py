"""The real demo model, SmolLM2-135M-Instruct Q4_1, against Hugging Face transformers loading the
same GGUF (dequantized to float32): greedy tokens, perplexity, and the engine against itself."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from engine import Engine  # noqa: E402

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is the largest planet in the solar system?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def engine(demo_model):
    with Engine.load(demo_model, n_ctx=512) as e:
        yield e


@pytest.fixture(scope="module")
def hf_model(demo_model):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(demo_model.parent), gguf_file=demo_model.name, dtype=torch.float32)
    return model.eval()


def hf_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def test_logits_match_transformers(engine, hf_model):
    ids = engine.tokenizer.encode(PROMPTS[1])
    ours, ref = engine.logits(ids), hf_logits(hf_model, ids)
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 1e-3 * scale


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_32_tokens_match_transformers(engine, hf_model, prompt):
    ids = engine.tokenizer.encode(prompt)
    ours = list(engine.generate_tokens(ids, 32))
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                eos_token_id=sorted(engine.tokenizer.eog_ids), pad_token_id=engine.tokenizer.eos_id)
    ref = out[0, len(ids):].tolist()
    ref = [t for t in ref if t not in engine.tokenizer.eog_ids]  # ours stops before the end token
    assert ours == ref, (engine.tokenizer.decode(ours), engine.tokenizer.decode(ref))


def pydoc_text(n_chars=12000):
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))[:n_chars]


def test_perplexity_matches_transformers(engine, hf_model):
    text, n_ctx = pydoc_text(), 256
    ours = engine.perplexity(text, n_ctx)
    # transformers, scored the same way: chunks of n_ctx, second half of each chunk
    tok = engine.tokenizer
    ids = tok.encode(text, add_special=True, parse_special=False)
    nll, count = 0.0, 0
    for c in range(len(ids) // n_ctx):
        chunk = ids[c * n_ctx:(c + 1) * n_ctx]
        if tok.add_bos:
            chunk = [tok.bos_id] + chunk[1:]
        logp = torch.log_softmax(torch.tensor(hf_logits(hf_model, chunk), dtype=torch.float64), -1).numpy()
        targets = ids[c * n_ctx + n_ctx // 2 + 1:(c + 1) * n_ctx]
        nll -= sum(logp[n_ctx // 2 + i, t] for i, t in enumerate(targets))
        count += len(targets)
    ref = float(np.exp(nll / count))
    assert 2 < ours < 100  # a real model on English-ish text
    assert abs(ours - ref) / ref < 0.005, (ours, ref)


def test_kv_cached_decode_equals_full_forward(engine):
    ids = engine.tokenizer.encode(PROMPTS[0] + " Paris, and the capital of Germany is Berlin.")
    full = engine.logits(ids)  # one forward over the whole sequence
    model, split = engine.model, 4
    steps = [model.forward(ids[:split], 0, all_logits=True)]
    for pos in range(split, len(ids)):  # then one token at a time through the KV cache
        steps.append(model.forward(ids[pos:pos + 1], pos))
    cached = np.concatenate(steps)
    scale = np.abs(full).max()
    assert np.abs(cached - full).max() <= 1e-4 * scale
    assert (cached.argmax(-1) == full.argmax(-1)).all()


def test_generate_text_is_english(engine):
    text = engine.generate("The capital of France is", max_new_tokens=8)
    assert "Paris" in text


def test_chat_answers(engine):
    reply = engine.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in reply


def test_stream_equals_generate_and_stops(engine):
    pieces = list(engine.stream("Count: one, two, three,", max_new_tokens=24))
    assert "".join(pieces) == engine.generate("Count: one, two, three,", max_new_tokens=24)
    stopped = engine.generate("Count: one, two, three,", max_new_tokens=24, stop=["five"])
    assert "five" not in stopped and "".join(pieces).startswith(stopped)


def test_context_overflow_is_refused(engine):
    with pytest.raises(ValueError, match="exceed n_ctx=512"):
        engine.generate("hello", max_new_tokens=600)
