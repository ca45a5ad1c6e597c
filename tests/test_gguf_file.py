"""The GGUF reader and weight loader: split shards, and a clear error for each kind of bad file."""
import shutil

import gguf
import numpy as np
import pytest

from weightstream.engine.model.config import ConfigError, ModelConfig
from weightstream.engine.formats.gguf_file import GGUFError, GGUFFile
from weightstream.engine.model.weights import load_weights
from tests.tiny_gguf import tiny_llama_metadata, tiny_llama_tensors, write_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "tiny.gguf"
    return write_gguf(path, tiny_llama_tensors(), tiny_llama_metadata())


def test_reads_tensors_and_metadata(tiny):
    with GGUFFile(tiny) as f:
        assert f.metadata["general.architecture"] == "llama"
        expected = tiny_llama_tensors()
        assert set(f.tensors) == set(expected)
        for name, arr in expected.items():
            assert f.info(name).shape == arr.shape
            np.testing.assert_array_equal(f.array(name), arr)
        cfg = ModelConfig.from_metadata(f.metadata)
        assert (cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.head_dim) == (2, 4, 2, 16)
        load_weights(f, cfg)


def test_split_shards_equal_single_file(tmp_path, tiny):
    tensors = tiny_llama_tensors()
    write_gguf(tmp_path / "m.gguf", tensors, tiny_llama_metadata(), split_max_tensors=7)
    shards = sorted(tmp_path.glob("m-*-of-*.gguf"))
    assert len(shards) == 3, shards
    with GGUFFile(shards[1]) as split, GGUFFile(tiny) as single:  # any shard opens the whole set
        assert len(split.paths) == 3
        assert split.metadata["llama.block_count"] == single.metadata["llama.block_count"]
        assert set(split.tensors) == set(single.tensors)
        for name in single.tensors:
            np.testing.assert_array_equal(split.array(name), single.array(name))


def test_missing_shard(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_llama_tensors(), tiny_llama_metadata(), split_max_tensors=7)
    (tmp_path / "m-00002-of-00003.gguf").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing shard m-00002-of-00003\.gguf"):
        GGUFFile(tmp_path / "m-00001-of-00003.gguf")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        GGUFFile(tmp_path / "nope.gguf")


def test_truncated_file(tmp_path, tiny):
    data = tiny.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(GGUFError, match=r"cut\.gguf: truncated: tensor .* at offset \d+ needs \d+ bytes"):
        GGUFFile(cut)


def test_truncated_inside_header(tmp_path, tiny):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny.read_bytes()[:300])
    with pytest.raises(GGUFError, match=r"cut\.gguf"):
        GGUFFile(cut)


def test_corrupt_magic(tmp_path, tiny):
    bad = tmp_path / "bad.gguf"
    data = bytearray(tiny.read_bytes())
    data[:4] = b"GGML"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=r"bad magic b'GGML', expected b'GGUF'"):
        GGUFFile(bad)


def test_unsupported_version(tmp_path, tiny):
    bad = tmp_path / "v9.gguf"
    data = bytearray(tiny.read_bytes())
    data[4:8] = (9).to_bytes(4, "little")
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFError, match="GGUF version 9 not supported"):
        GGUFFile(bad)


def test_wrong_tensor_shape(tmp_path):
    tensors = tiny_llama_tensors()
    tensors["blk.1.attn_k.weight"] = tensors["blk.1.attn_k.weight"][:16]
    path = write_gguf(tmp_path / "shape.gguf", tensors, tiny_llama_metadata())
    with GGUFFile(path) as f:
        cfg = ModelConfig.from_metadata(f.metadata)
        with pytest.raises(GGUFError, match=r"blk\.1\.attn_k\.weight has shape \[16, 64\], expected \[32, 64\]"):
            load_weights(f, cfg)


def test_missing_tensor(tmp_path):
    tensors = tiny_llama_tensors()
    del tensors["blk.0.ffn_norm.weight"]
    path = write_gguf(tmp_path / "missing.gguf", tensors, tiny_llama_metadata())
    with GGUFFile(path) as f:
        with pytest.raises(GGUFError, match=r"blk\.0\.ffn_norm\.weight not found"):
            load_weights(f, ModelConfig.from_metadata(f.metadata))


def test_unknown_architecture(tmp_path):
    path = write_gguf(tmp_path / "arch.gguf", tiny_llama_tensors(), tiny_llama_metadata("mamba"), arch="mamba")
    with GGUFFile(path) as f:
        with pytest.raises(ConfigError, match=r"unsupported architecture 'mamba'"):
            ModelConfig.from_metadata(f.metadata, source=str(path))


def test_unsupported_tensor_type(tmp_path):
    tensors = tiny_llama_tensors()
    # IQ2_XXS: a real ggml type (66 bytes per 256 weights) that we do not support
    raw = np.zeros((64, 66), dtype=np.uint8)  # 64 rows x 256 cols of IQ2_XXS
    tensors["blk.0.ffn_up.weight"] = raw
    path = write_gguf(tmp_path / "iq.gguf", tensors, tiny_llama_metadata(),
                      raw_types={"blk.0.ffn_up.weight": gguf.GGMLQuantizationType.IQ2_XXS})
    with pytest.raises(GGUFError, match=r"blk\.0\.ffn_up\.weight has type IQ2_XXS, which weightstream does not support"):
        GGUFFile(path)


def test_engine_load_reports_missing_file(tmp_path):
    from weightstream.engine import Engine

    with pytest.raises(FileNotFoundError):
        Engine.load(tmp_path / "absent.gguf")


def test_copy_is_independent(tmp_path, tiny):
    """Closing one GGUFFile does not disturb another open on a copy of the same bytes."""
    other = tmp_path / "copy.gguf"
    shutil.copy(tiny, other)
    a, b = GGUFFile(tiny), GGUFFile(other)
    a.close()
    np.testing.assert_array_equal(b.array("output_norm.weight"), tiny_llama_tensors()["output_norm.weight"])
    b.close()


def test_metadata_arrays_equal_gguf_readers(tmp_path):
    """Our one-step array parsing (weightstream.engine.formats.gguf_file._CheckedReader) reads what gguf's reader reads."""
    meta = tiny_llama_metadata()
    meta["tokenizer.ggml.tokens"] = ["", "a", "ü€𝄞", "x" * 300] + [f"<t{i}>" for i in range(4, len(meta["tokenizer.ggml.tokens"]))]
    meta["tokenizer.ggml.scores"] = [float(i) / 3 for i in range(len(meta["tokenizer.ggml.tokens"]))]
    meta["tokenizer.ggml.merges"] = []  # empty array (gguf's writer leaves it out)
    path = write_gguf(tmp_path / "m.gguf", tiny_llama_tensors(), meta)
    reference = {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items()}
    assert {"tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"} <= set(reference)
    with GGUFFile(path) as f:
        for key in reference:
            if not key.startswith("GGUF."):
                assert f.metadata[key] == reference[key], key


def test_truncated_inside_string_array(tmp_path, tiny):
    data = tiny.read_bytes()
    cut_at = data.index(b"<t7>") + 2  # in the middle of the vocabulary
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:cut_at])
    with pytest.raises(GGUFError, match=r"cut\.gguf: corrupt or truncated GGUF .*past the end"):
        GGUFFile(cut)
