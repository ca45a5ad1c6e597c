"""A forward pass that goes NaN / Inf raises NonFiniteError naming the first layer whose output
went non-finite and the token position (issue 16, item 5), instead of sampling token 0; the CLI
prints it as one line."""
import gguf
import numpy as np
import pytest

from weightstream import Engine
from weightstream.engine.cli.main import main
from weightstream.engine.errors import NonFiniteError, WeightstreamError

from .tiny_gguf import tiny_llama_metadata, tiny_llama_tensors, write_gguf

N_LAYER = 4
POISONED_LAYER = 2
Q8_0 = gguf.GGMLQuantizationType.Q8_0


def _four_layer_tensors() -> dict[str, np.ndarray]:
    """The tiny llama with 4 layers: tiny_gguf's two, then two more from another seed."""
    tensors = tiny_llama_tensors(0)
    more = tiny_llama_tensors(1)
    for i in (0, 1):
        for name, arr in more.items():
            if name.startswith(f"blk.{i}."):
                tensors[name.replace(f"blk.{i}.", f"blk.{i + 2}.", 1)] = arr
    return tensors


def _model(tmp_path, poison: str | None, block_scale: float = np.nan):
    """A 4-layer tiny model whose blk.2.ffn_down.weight is Q8_0; poison: None (clean), "layer"
    (that tensor's first block scale set to block_scale) or "head" (a NaN in output_norm.weight)."""
    tensors = _four_layer_tensors()
    name = f"blk.{POISONED_LAYER}.ffn_down.weight"
    raw = gguf.quants.quantize(tensors[name], Q8_0)  # uint8[rows, 34 * cols / 32]
    if poison == "layer":
        raw[0, :2] = np.array([block_scale], np.float16).view(np.uint8)  # block 0's fp16 d
    tensors[name] = raw
    if poison == "head":
        tensors["output_norm.weight"] = tensors["output_norm.weight"].copy()
        tensors["output_norm.weight"][5] = np.nan
    meta = tiny_llama_metadata()
    meta["llama.block_count"] = N_LAYER
    meta["tokenizer.ggml.tokens"][2] = "<t0><t1>"  # one merge: a BPE vocabulary needs at least one
    meta["tokenizer.ggml.merges"] = ["<t0> <t1>"]
    for k in range(26):  # the letters, so that the CLI's text prompt encodes
        meta["tokenizer.ggml.tokens"][100 + k] = chr(ord("a") + k)
    return write_gguf(tmp_path / f"tiny-{poison}.gguf", tensors, meta, raw_types={name: Q8_0})


PROMPT = [3, 17, 42, 9]


def test_a_clean_model_generates(tmp_path):
    with Engine.load(_model(tmp_path, None)) as eng:
        assert len(list(eng.generate_tokens(PROMPT, max_new_tokens=3, temperature=0))) == 3


@pytest.mark.parametrize("scale", [np.nan, np.inf], ids=["nan", "inf"])
def test_a_non_finite_block_scale_in_layer_2_raises_naming_layer_2(tmp_path, scale):
    with Engine.load(_model(tmp_path, "layer", scale)) as eng:
        with pytest.raises(NonFiniteError, match=r"layer 2 \(tensors blk\.2\.\*\), at token position 0") as info:
            eng.generate(PROMPT, max_new_tokens=3)
    assert isinstance(info.value, WeightstreamError) and isinstance(info.value, FloatingPointError)


def test_the_decode_step_names_its_own_position(tmp_path):
    """A forward over one token at position 4 names position 4 (the prompt's positions are past)."""
    with Engine.load(_model(tmp_path, "layer")) as eng:
        model = eng._require_open()
        with pytest.raises(NonFiniteError, match="layer 2 .* at token position 4"):
            model.forward([7], 4)


def test_a_nan_in_the_head_names_the_head(tmp_path):
    with Engine.load(_model(tmp_path, "head")) as eng:
        with pytest.raises(NonFiniteError, match=r"at token position 3 although every layer's output "
                                                 r"was finite: the output head \(output_norm\.weight"):
            eng.generate(PROMPT, max_new_tokens=3)


def test_the_cli_prints_one_line_without_a_traceback(tmp_path, capsys):
    path = _model(tmp_path, "layer")
    rc = main(["run", str(path), "-p", "abc", "-n", "3"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("weightstream: error: forward:"), err
    assert "layer 2" in lines[0] and "Traceback" not in err


def test_first_nonfinite_row_finds_nan_and_inf_anywhere_and_nothing_else():
    from weightstream.kernels import _ops

    x = np.full((5, 70), np.finfo(np.float32).max, np.float32)  # huge but finite
    x[1] = -np.finfo(np.float32).tiny / 4                       # subnormal
    assert _ops.first_nonfinite_row(x) == -1
    for value in (np.nan, np.inf, -np.inf, -np.nan):
        for row, col in ((0, 0), (3, 69), (4, 33)):
            y = x.copy()
            y[row, col] = value
            y[4, 1] = value  # a later row too: the first is reported
            assert _ops.first_nonfinite_row(y) == min(row, 4)
    assert _ops.first_nonfinite_row(np.empty((0, 4), np.float32)) == -1
    assert _ops.first_nonfinite_row(np.empty((3, 0), np.float32)) == -1
