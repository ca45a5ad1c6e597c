"""Every supported architecture against Hugging Face transformers on the same weights.

A tiny random-init transformers model of each case is converted to GGUF by our converter; our
engine's logits and greedy tokens must match transformers'. For F16 / BF16 / Q8_0 files the
reference is the same transformers model with its weights replaced by their round-trip through
that type (gguf's own quantize/dequantize), i.e. transformers on the values the file holds.

The forward pass is checked with the "numpy" backend (float activations, the same math as
transformers). The fused kernels round activations to int8 for block types as llama.cpp does;
their logits are checked against the float ones separately, with the error that rounding costs.
"""
import gguf
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from weightstream.engine import Engine  # noqa: E402
from weightstream.engine.tools.convert import convert_hf_to_gguf  # noqa: E402
from tests.hf_models import CASES, make_hf_model, smollm2_gguf_path  # noqa: E402

if smollm2_gguf_path() is None:
    pytest.skip("demo model (tokenizer source) unavailable", allow_module_level=True)

N_TOKENS, N_GREEDY = 64, 32
# max |ours - reference| allowed, as a fraction of the reference logits' largest magnitude
TOLERANCE = {"f32": 1e-3, "f16": 1e-3, "bf16": 2e-3, "q8_0": 1e-3}
# fused kernels vs the float path: NMSE of the logits (int8 activations cost ~1e-4 per matmul)
FUSED_NMSE = {"f32": 1e-10, "f16": 1e-10, "bf16": 1e-10, "q8_0": 5e-3}  # MoE: near-tie routes flip


@pytest.fixture(scope="module", params=sorted(CASES))
def hf_case(request, tmp_path_factory):
    torch.manual_seed(0)
    model, path = make_hf_model(request.param, tmp_path_factory.mktemp(request.param), seed=1)
    return request.param, model, path


def round_trip(model, out_type: str):
    """A copy of model whose matrices hold what a GGUF of out_type holds: 1-D tensors and routers
    stay F32 (as llama.cpp writes them); other matrices go through out_type and back."""
    import copy

    qtype = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[out_type]
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if p.ndim == 1 or name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")):
                continue
            arr = p.detach().numpy()
            if qtype == gguf.GGMLQuantizationType.Q8_0 and arr.shape[-1] % 32:
                qt = gguf.GGMLQuantizationType.F16  # llama.cpp's fallback for rows that are not whole blocks
            else:
                qt = qtype
            back = gguf.quants.dequantize(gguf.quants.quantize(arr, qt), qt).reshape(arr.shape)
            p.copy_(torch.from_numpy(np.ascontiguousarray(back)))
    return twin


def prompt_ids(n_vocab: int) -> list[int]:
    return np.random.default_rng(5).integers(5, n_vocab, N_TOKENS).tolist()  # avoid end-of-generation ids


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_logits_and_greedy_match_transformers(hf_case, out_type, tmp_path):
    case, model, hf_dir = hf_case
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / f"{case}-{out_type}.gguf", out_type)
    reference = model if out_type == "f32" else round_trip(model, out_type)
    ids = prompt_ids(model.config.vocab_size)
    with Engine.load(gguf_path, n_ctx=N_TOKENS + N_GREEDY + 8, backend="numpy") as engine:
        ours = engine.logits(ids)
        with torch.no_grad():
            ref = reference(torch.tensor([ids])).logits[0].numpy()
        scale = float(np.abs(ref).max())
        err = float(np.abs(ours - ref).max())
        assert err <= TOLERANCE[out_type] * scale, f"{case} {out_type}: max err {err:.3g}, logit scale {scale:.3g}"

        if out_type in ("f32", "q8_0"):  # greedy decoding through the KV cache, token for token
            mine = list(engine.generate_tokens(ids[:8], N_GREEDY))
            with torch.no_grad():
                out = reference.generate(torch.tensor([ids[:8]]), max_new_tokens=N_GREEDY, do_sample=False,
                                         eos_token_id=sorted(engine.tokenizer.eog_ids),
                                         pad_token_id=engine.tokenizer.eos_id)
            theirs = [t for t in out[0, 8:].tolist() if t not in engine.tokenizer.eog_ids]
            assert mine == theirs, case


@pytest.mark.parametrize("out_type", ["f32", "q8_0"])
@pytest.mark.parametrize("backend", ["cython", "numba"])
def test_fused_backends_match_the_float_path(hf_case, out_type, backend, tmp_path):
    import weightstream.kernels as kernels
    from weightstream.kernels.quantize import nmse

    case, model, hf_dir = hf_case
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "q8_0": gguf.GGMLQuantizationType.Q8_0}[out_type]
    if kernels.backends.kernel_for(backend, qtype) is None:
        pytest.skip(f"no {backend} kernel for {out_type} here")
    gguf_path = convert_hf_to_gguf(hf_dir, tmp_path / f"{case}-{out_type}.gguf", out_type)
    ids = prompt_ids(model.config.vocab_size)
    with Engine.load(gguf_path, backend="numpy") as float_engine, Engine.load(gguf_path, backend=backend) as fused:
        assert nmse(fused.logits(ids), float_engine.logits(ids)) < FUSED_NMSE[out_type]
