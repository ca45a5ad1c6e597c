"""The validating GGUF reader (engine/formats/gguf_header.py, issue 16 items 4, 6, 7, 3-FIFO): each
structural defect of a file is refused with a GGUFError naming the file, the key or tensor, the
offset and what was expected, before anything is allocated. The invalid files are a small valid
one (tests/tiny_gguf.py) with bytes patched at the places read_layout reports."""
import os
import re
import resource
import subprocess
import sys
import time

import numpy as np
import pytest

from weightstream.engine.errors import GGUFError, WeightstreamError
from weightstream.engine.formats.gguf_file import GGUFFile
from weightstream.engine.formats.gguf_header import read_layout
from tests.tiny_gguf import patched_gguf, tiny_llama_metadata, tiny_llama_tensors, write_gguf

U64 = 2**64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    meta = tiny_llama_metadata()
    meta["general.dup_a"] = "x"  # two keys of one length: one renamed to the other is a duplicate
    meta["general.dup_b"] = "y"
    return write_gguf(tmp_path_factory.mktemp("valid") / "tiny.gguf", tiny_llama_tensors(), meta)


@pytest.fixture(scope="module")
def layout(tiny):
    return read_layout(tiny)


def kv(layout, key):
    return next(f for f in layout.kv if f.key == key)


def tensor(layout, name):
    return next(t for t in layout.tensors if t.name == name)


def type_offset(t):  # tensor info: n_dims (u32), dims (u64 each), type (u32), offset (u64)
    return t.dims_offset + 4 + 8 * len(t.shape)


def refused(path, *patterns):
    """GGUFFile(path) raises a GGUFError whose message names the file and matches each pattern."""
    with pytest.raises(GGUFError) as e:
        GGUFFile(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    for p in patterns:
        assert re.search(p, msg), (p, msg)
    assert isinstance(e.value, WeightstreamError) and "\n" not in msg
    return msg


# ---- bounded parse: counts and lengths against the bytes left -----------------------------------
def test_a_huge_array_count_fails_fast_without_allocating(tmp_path, tiny, layout):
    """The review's case: a 40 MiB file whose vocabulary claims 2^40 strings cost 2.2 GiB and 12 s."""
    tokens = kv(layout, "tokenizer.ggml.tokens")
    bad = patched_gguf(tiny, tmp_path / "huge.gguf", [(tokens.value_offset + 4, "Q", 2**40)],
                       extra=bytes(40 << 20))
    before, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    refused(bad, r"key 'tokenizer\.ggml\.tokens'", r"claims 1099511627776 STRING items",
            rf"offset {tokens.value_offset}", r"bytes are left")
    took, grew_kib = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert took < 1.0, took
    assert grew_kib < 64 * 1024, f"peak RSS grew {grew_kib} KiB"


def test_a_huge_scalar_array_count_fails_fast(tmp_path, tiny, layout):
    types = kv(layout, "tokenizer.ggml.token_type")
    bad = patched_gguf(tiny, tmp_path / "huge.gguf", [(types.value_offset + 4, "Q", 2**62)])
    t0 = time.perf_counter()
    refused(bad, r"key 'tokenizer\.ggml\.token_type'", r"claims 4611686018427387904 INT32 items")
    assert time.perf_counter() - t0 < 1.0


def test_a_huge_string_length_fails_fast(tmp_path, tiny, layout):
    name = kv(layout, "general.dup_a")
    bad = patched_gguf(tiny, tmp_path / "len.gguf", [(name.value_offset, "Q", U64 - 1)])
    refused(bad, r"string value of 18446744073709551615 bytes", rf"at offset {name.value_offset + 8}",
            r"past the end of the file")


def test_huge_header_counts_fail_fast(tmp_path, tiny):
    for field, at in (("key/value", 16), ("tensors", 8)):
        bad = patched_gguf(tiny, tmp_path / f"{field.replace('/', '_')}.gguf", [(at, "Q", 2**63)])
        refused(bad, r"the header claims", r"need at least \d+ bytes, past the end of the file")


def test_a_truncated_file_is_refused_in_every_region(tmp_path, tiny, layout):
    for cut in (3, 20, layout.kv[3].value_offset + 1, layout.tensor_infos_offset + 5,
                layout.tensor_infos_end - 1, layout.data_offset + 10, layout.data_end - 1):
        refused(patched_gguf(tiny, tmp_path / f"cut{cut}.gguf", cut=cut), "too short|truncated")


# ---- metadata -----------------------------------------------------------------------------------
def test_an_unknown_value_type_is_refused(tmp_path, tiny, layout):
    f = kv(layout, "llama.block_count")
    bad = patched_gguf(tiny, tmp_path / "vt.gguf", [(f.value_offset - 4, "I", 13)])
    refused(bad, r"key 'llama\.block_count': unknown value type 13", rf"offset {f.value_offset - 4}")


def test_an_unknown_or_nested_array_item_type_is_refused(tmp_path, tiny, layout):
    f = kv(layout, "tokenizer.ggml.token_type")
    for item in (9, 77):
        bad = patched_gguf(tiny, tmp_path / f"item{item}.gguf", [(f.value_offset, "I", item)])
        refused(bad, rf"key 'tokenizer\.ggml\.token_type': array item type {item}")


def test_a_duplicate_key_is_refused_naming_the_key(tmp_path, tiny, layout):
    b = kv(layout, "general.dup_b")
    key_at = b.offset + 8 + len("general.dup_")  # the 'b' of the second key becomes 'a'
    bad = patched_gguf(tiny, tmp_path / "dup.gguf", [(key_at, b"a")])
    refused(bad, r"duplicate key 'general\.dup_a'", rf"offset {b.offset}")


def test_a_non_utf8_key_is_refused_naming_its_offset(tmp_path, tiny, layout):
    f = kv(layout, "llama.context_length")
    bad = patched_gguf(tiny, tmp_path / "key.gguf", [(f.offset + 8 + 2, b"\xff")])
    refused(bad, r"key of key/value pair \d+ at offset " + str(f.offset + 8), "not valid UTF-8")


def test_a_non_utf8_string_value_is_refused_naming_the_key_and_offset(tmp_path, tiny, layout):
    tokens = kv(layout, "tokenizer.ggml.tokens")
    first = tokens.value_offset + 12 + 8  # item type, count, then the first string's length
    bad = patched_gguf(tiny, tmp_path / "val.gguf", [(first + 1, b"\xc3\x28")])
    refused(bad, r"key 'tokenizer\.ggml\.tokens': string 0 of array", rf"at offset {first} is not valid UTF-8")


def test_a_cut_utf8_sequence_before_a_long_string_is_refused(tmp_path):
    """The array's strings are checked in one decode with the length fields zeroed: a string ending
    in half a euro sign (e2 82) followed by one of 172 (0xac) bytes must not pass as a whole '€'."""
    meta = tiny_llama_metadata()
    meta["tokenizer.ggml.tokens"] = ["ab", "x" * 0xAC] + meta["tokenizer.ggml.tokens"][2:]
    good = write_gguf(tmp_path / "good.gguf", tiny_llama_tensors(), meta)
    first = kv(read_layout(good), "tokenizer.ggml.tokens").value_offset + 12 + 8
    bad = patched_gguf(good, tmp_path / "cut.gguf", [(first, b"\xe2\x82")])
    refused(bad, rf"key 'tokenizer\.ggml\.tokens': string 0 of array .* at offset {first} is not valid UTF-8")


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_an_alignment_not_a_power_of_two_is_refused(tmp_path, alignment):
    good = write_gguf(tmp_path / "a64.gguf", tiny_llama_tensors(), tiny_llama_metadata(), alignment=64)
    f = kv(read_layout(good), "general.alignment")
    bad = patched_gguf(good, tmp_path / "a.gguf", [(f.value_offset, "I", alignment)])
    refused(bad, rf"general\.alignment is {alignment} \(at offset {f.value_offset}\), expected a power of two")


def test_an_alignment_of_another_type_is_refused(tmp_path):
    good = write_gguf(tmp_path / "a64.gguf", tiny_llama_tensors(), tiny_llama_metadata(), alignment=64)
    f = kv(read_layout(good), "general.alignment")
    bad = patched_gguf(good, tmp_path / "a.gguf", [(f.value_offset - 4, "I", 5)])  # INT32
    refused(bad, r"general\.alignment .* has type INT32, expected UINT32")


def test_a_file_with_its_own_alignment_loads(tmp_path):
    """The rules are llama.cpp's, not stricter: a valid file aligned to 64 opens, tensors intact."""
    good = write_gguf(tmp_path / "a64.gguf", tiny_llama_tensors(), tiny_llama_metadata(), alignment=64)
    with GGUFFile(good) as f:
        assert all(t.offset % 64 == 0 for t in f.tensors.values())
        np.testing.assert_array_equal(f.array("output.weight"), tiny_llama_tensors()["output.weight"])


# ---- tensor table -------------------------------------------------------------------------------
def test_more_than_4_dims_is_refused(tmp_path, tiny, layout):
    t = tensor(layout, "blk.0.attn_q.weight")
    for n in (5, 0, 2**32 - 1):
        bad = patched_gguf(tiny, tmp_path / f"nd{n}.gguf", [(t.dims_offset, "I", n)])
        refused(bad, rf"tensor blk\.0\.attn_q\.weight: n_dims is {n} at offset {t.dims_offset}, expected 1 to 4")


@pytest.mark.parametrize("dim", [0, -1, -(2**63)])
def test_a_zero_or_negative_dim_is_refused(tmp_path, tiny, layout, dim):
    t = tensor(layout, "blk.1.ffn_up.weight")
    bad = patched_gguf(tiny, tmp_path / "dim.gguf", [(t.dims_offset + 12, "q", dim)])
    refused(bad, rf"tensor blk\.1\.ffn_up\.weight: dimension 1 is {dim} at offset {t.dims_offset + 12}, "
                 r"expected a positive count")


def test_an_element_count_overflowing_int64_is_refused(tmp_path, tiny, layout):
    t = tensor(layout, "blk.1.ffn_up.weight")
    bad = patched_gguf(tiny, tmp_path / "ovf.gguf", [(t.dims_offset + 4, "q", 2**62), (t.dims_offset + 12, "q", 4)])
    refused(bad, r"tensor blk\.1\.ffn_up\.weight: shape \[4611686018427387904, 4\]", r"more than 2\^63-1")


def test_a_huge_tensor_is_refused_as_past_the_end(tmp_path, tiny, layout):
    t = tensor(layout, "output.weight")
    bad = patched_gguf(tiny, tmp_path / "big.gguf", [(t.dims_offset + 12, "q", 2**40)])
    refused(bad, r"tensor output\.weight at offset \d+ needs 281474976710656 bytes", "file has only")


@pytest.mark.parametrize("type_id", [4, 99, 2**32 - 1])
def test_an_unknown_tensor_type_is_refused(tmp_path, tiny, layout, type_id):
    t = tensor(layout, "blk.0.ffn_down.weight")
    bad = patched_gguf(tiny, tmp_path / "type.gguf", [(type_offset(t), "I", type_id)])
    refused(bad, rf"tensor blk\.0\.ffn_down\.weight has unknown tensor type id {type_id} "
                 rf"\(at offset {type_offset(t)}\)")


def test_a_tensor_type_not_matching_its_bytes_is_refused(tmp_path, tiny, layout):
    """F32 relabelled F16: half the bytes, so the next tensor no longer starts where this one ends."""
    i = next(k for k, t in enumerate(layout.tensors) if t.name == "blk.0.ffn_down.weight")
    t, nxt = layout.tensors[i], layout.tensors[i + 1]
    bad = patched_gguf(tiny, tmp_path / "f16.gguf", [(type_offset(t), "I", 1)])
    refused(bad, rf"tensor {nxt.name} has data offset {nxt.offset - layout.data_offset} .* expected "
                 rf"{t.offset - layout.data_offset + t.nbytes // 2}")


def test_a_row_not_a_multiple_of_the_block_size_is_refused(tmp_path, tiny, layout):
    t = tensor(layout, "blk.0.ffn_down.weight")
    assert t.shape[-1] == 128
    bad = patched_gguf(tiny, tmp_path / "q4k.gguf", [(type_offset(t), "I", 12)])  # Q4_K: 256 per block
    refused(bad, r"tensor blk\.0\.ffn_down\.weight \(Q4_K\) has 128 columns, not a multiple of the block size 256")


def offset_edit(layout, name, rel):
    t = tensor(layout, name)
    return [(type_offset(t) + 4, "Q", rel % U64)]


def test_a_tensor_offset_near_2_64_is_refused(tmp_path, tiny, layout):
    """The review's wrap-around: data_offset + offset overflows 2^64 and lands in the header."""
    name = "blk.1.attn_v.weight"
    bad = patched_gguf(tiny, tmp_path / "wrap.gguf", offset_edit(layout, name, -layout.data_offset))
    refused(bad, rf"tensor {name} has data offset {U64 - layout.data_offset}", r"expected \d+")


def test_engine_load_refuses_a_wrapped_tensor_offset(tmp_path, tiny, layout):
    """Through the engine's own load path (the review's file loaded and gave NaN logits)."""
    from weightstream.engine import Engine

    bad = patched_gguf(tiny, tmp_path / "wrap.gguf", offset_edit(layout, "output.weight", -layout.data_offset))
    with pytest.raises(GGUFError, match=rf"wrap\.gguf: tensor output\.weight has data offset {U64 - layout.data_offset}"):
        Engine.load(bad)


def test_overlapping_tensors_are_refused(tmp_path, tiny, layout):
    second = layout.tensors[1].name
    bad = patched_gguf(tiny, tmp_path / "overlap.gguf", offset_edit(layout, second, 0))
    refused(bad, rf"tensor {second} has data offset 0 .* expected {layout.tensors[1].offset - layout.data_offset}")


def test_a_misaligned_tensor_offset_is_refused(tmp_path, tiny, layout):
    t = layout.tensors[2]
    bad = patched_gguf(tiny, tmp_path / "mis.gguf", offset_edit(layout, t.name, t.offset - layout.data_offset + 4))
    refused(bad, rf"tensor {t.name} has data offset", "alignment 32")


def test_a_gap_between_tensors_is_refused(tmp_path, tiny, layout):
    t = layout.tensors[2]
    bad = patched_gguf(tiny, tmp_path / "gap.gguf", offset_edit(layout, t.name, t.offset - layout.data_offset + 32))
    refused(bad, rf"tensor {t.name} has data offset {t.offset - layout.data_offset + 32}")


def test_a_data_section_past_the_end_is_refused(tmp_path, tiny, layout):
    last = layout.tensors[-1]
    bad = patched_gguf(tiny, tmp_path / "end.gguf", cut=last.offset + last.nbytes - 1)
    refused(bad, rf"truncated: tensor {last.name} at offset {last.offset} needs {last.nbytes} bytes",
            rf"file has only {last.offset + last.nbytes - 1} bytes")


def test_a_duplicate_tensor_name_is_refused(tmp_path, tiny, layout):
    a, b = tensor(layout, "blk.0.ffn_up.weight"), tensor(layout, "blk.1.ffn_up.weight")
    bad = patched_gguf(tiny, tmp_path / "dupt.gguf", [(b.info_offset + 8 + 4, b"0")])
    refused(bad, r"duplicate tensor name 'blk\.0\.ffn_up\.weight'", rf"offset {b.info_offset}")
    assert a.info_offset < b.info_offset


def test_a_too_long_tensor_name_is_refused(tmp_path):
    tensors = tiny_llama_tensors()
    tensors["x" * 64] = tensors.pop("output.weight")
    bad = write_gguf(tmp_path / "long.gguf", tensors, tiny_llama_metadata())
    refused(bad, r"is 64 bytes, expected fewer than 64")


def test_each_split_shard_is_checked(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_llama_tensors(), tiny_llama_metadata(), split_max_tensors=7)
    second = tmp_path / "m-00002-of-00003.gguf"
    lay = read_layout(second)
    patched_gguf(second, second, offset_edit(lay, lay.tensors[1].name, 0))
    with pytest.raises(GGUFError, match=rf"m-00002-of-00003\.gguf: tensor {lay.tensors[1].name} has data offset 0"):
        GGUFFile(tmp_path / "m-00001-of-00003.gguf")


# ---- non-regular files --------------------------------------------------------------------------
def test_a_fifo_model_path_is_refused_without_blocking(tmp_path):
    """In a subprocess: were the open to block, the test would time out rather than hang pytest."""
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    code = ("import sys\nfrom weightstream.engine import Engine\n"
            "try:\n    Engine.load(sys.argv[1])\nexcept Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code, str(fifo)], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"GGUFError {fifo}: is a FIFO (named pipe), not a GGUF file (a model path must " \
                                 f"be a regular file)", out.stdout + out.stderr


def test_the_cli_refuses_a_fifo_in_one_line(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    out = subprocess.run([sys.executable, "-m", "weightstream.engine", "info", str(fifo)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines() == [f"weightstream: error: {fifo}: is a FIFO (named pipe), not a GGUF "
                                               f"file (a model path must be a regular file)"], out.stderr


def test_a_directory_model_path_is_refused(tmp_path):
    refused(tmp_path, r"is a directory")


def test_a_device_model_path_is_refused():
    with pytest.raises(GGUFError, match=r"^/dev/null: is a character device, not a GGUF file"):
        GGUFFile("/dev/null")


def test_a_valid_file_still_opens_with_the_same_offsets_as_ggufs_reader(tiny, layout):
    import gguf

    r = gguf.GGUFReader(tiny)
    assert [(t.name, int(t.data_offset), int(t.n_bytes)) for t in r.tensors] == \
           [(t.name, t.offset, t.nbytes) for t in layout.tensors]
    assert layout.data_offset == r.data_offset
