"""A bounded, validating walk over a GGUF file's structure, done before anything else reads it.

Model files come from strangers, so every count and length in the header, the key/value pairs and
the tensor table is checked against the bytes left in the file before it is used: a 40 MiB file
that claims a 2^40-element array fails here in microseconds instead of allocating gigabytes. The
tensor table is checked as llama.cpp's ggml/src/gguf.cpp (gguf_init_from_file_impl) checks it:
each tensor's offset must equal the running aligned size of the tensors before it in table order
(so no overlap, no gap, no misalignment, no wrap-around near 2^64), its size is type x shape, and
its bytes end inside the file. Nothing here allocates more than the file's own strings.

The walk also records where each field lies (`Layout`): the fuzz suite uses that to aim its
mutations. Python integers do not overflow, so the arithmetic is exact; the bounds checks are
what stand in for C's overflow checks.
"""
from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ...kernels import formats
from ..errors import GGUFError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name is shorter than this (llama.cpp refuses longer)
INT64_MAX = 2**63 - 1

# GGUF value type id -> (name, struct code of a scalar, or None for string / array)
STRING, ARRAY = 8, 9
VALUE_TYPES = {0: ("UINT8", "B"), 1: ("INT8", "b"), 2: ("UINT16", "H"), 3: ("INT16", "h"),
               4: ("UINT32", "I"), 5: ("INT32", "i"), 6: ("FLOAT32", "f"), 7: ("BOOL", "?"),
               STRING: ("STRING", None), ARRAY: ("ARRAY", None), 10: ("UINT64", "Q"),
               11: ("INT64", "q"), 12: ("FLOAT64", "d")}
# fewest bytes one key/value pair / one tensor info can take: bounds the header's counts
MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
MIN_TENSOR_INFO_BYTES = 8 + 4 + 8 + 4 + 8  # name length, n_dims, one dim, type, offset

_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISSOCK, "a socket"))


def check_regular_file(path: Path) -> int:
    """The file's size, after refusing anything but a regular file, by stat() alone: opening a
    FIFO for reading blocks until a writer comes, so this must run before any open()."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"GGUF file not found: {path}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "not a regular file")
        raise GGUFError(f"{path}: is {kind}, not a GGUF file (a model path must be a regular file)")
    return st.st_size


@dataclass(frozen=True)
class KVField:
    key: str
    vtype: int  # GGUF value type id
    offset: int  # of the key's length field
    value_offset: int  # of the value (for an array: of its item type field)
    end: int
    item_type: int | None = None  # arrays
    count: int | None = None  # arrays


@dataclass(frozen=True)
class TensorEntry:
    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]  # NumPy order (outermost first); GGUF's ne[] reversed
    nbytes: int
    offset: int  # absolute offset of the first byte in the file
    info_offset: int  # of the tensor info's name length field
    dims_offset: int  # of n_dims; the dims follow, then the type (u32) and the offset (u64)


@dataclass
class Layout:
    """Where the parts of a valid file lie (all offsets absolute)."""

    path: Path
    size: int
    version: int
    alignment: int
    kv: list[KVField] = field(default_factory=list)
    tensors: list[TensorEntry] = field(default_factory=list)
    tensor_infos_offset: int = 0
    tensor_infos_end: int = 0
    data_offset: int = 0  # start of the data section (aligned)
    data_end: int = 0  # end of the last tensor's bytes


class _Cursor:
    """Reads little-endian fields from the mapped file, each checked against the bytes left."""

    def __init__(self, path: Path, buf, size: int):
        self.path, self.buf, self.size, self.pos = path, buf, size, 0

    def fail(self, msg: str) -> GGUFError:
        return GGUFError(f"{self.path}: {msg}")

    def need(self, n: int, what: str) -> int:
        if n > self.size - self.pos:
            raise self.fail(f"corrupt or truncated GGUF ({self.size} bytes): {what} at offset {self.pos} "
                            f"needs {n} bytes, past the end of the file ({self.size - self.pos} bytes left)")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, code: str, what: str):
        start = self.need(struct.calcsize(code), what)
        return struct.unpack_from("<" + code, self.buf, start)[0]

    def text(self, what: str, key: str | None = None) -> str:
        """A GGUF string (u64 length, UTF-8 bytes). key: the metadata key it belongs to, for the
        message when the bytes are not UTF-8."""
        n = self.scalar("Q", f"length of {what}")
        start = self.need(n, f"{what} of {n} bytes")
        try:
            return str(self.buf[start:start + n], "utf-8")
        except UnicodeDecodeError as e:
            owner = f"key {key!r}: " if key is not None else ""
            raise self.fail(f"{owner}{what} at offset {start} is not valid UTF-8 "
                            f"(byte {e.start} of {n}: {e.reason})") from None


def read_layout(path: Path) -> Layout:
    """Walk and check the file's header, metadata and tensor table; raise GGUFError naming the
    file, the key or tensor, the offset and what was expected where any of it is invalid."""
    size = check_regular_file(path)
    if size < 24:
        with open(path, "rb") as f:  # regular, so this cannot block
            head = f.read(8)
        if head[:4] not in (MAGIC[:len(head)], MAGIC):
            raise GGUFError(f"{path}: bad magic {head[:4]!r}, expected {MAGIC!r}: not a GGUF file")
        raise GGUFError(f"{path}: file is {size} bytes, too short for a GGUF header (24 bytes)")
    with open(path, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # swapped between the stat and the open
            raise GGUFError(f"{path}: is not a regular file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            with memoryview(mm) as buf:  # bounds from the map, not the stat: a file cut since then
                return _walk(path, buf, len(mm))  # must not make a read past its end (SIGBUS)


def _walk(path: Path, buf, size: int) -> Layout:
    c = _Cursor(path, buf, size)
    magic = bytes(buf[0:4])
    if magic != MAGIC:
        raise GGUFError(f"{path}: bad magic {magic!r}, expected {MAGIC!r}: not a GGUF file")
    c.pos = 4
    version = c.scalar("I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} not supported (expected one of {SUPPORTED_VERSIONS})")
    n_tensors = c.scalar("Q", "tensor count")
    n_kv = c.scalar("Q", "key/value count")
    left = size - c.pos
    if n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES > left:
        raise c.fail(f"corrupt or truncated GGUF ({size} bytes): the header claims {n_kv} key/value pairs "
                     f"and {n_tensors} tensors, which need at least "
                     f"{n_kv * MIN_KV_BYTES + n_tensors * MIN_TENSOR_INFO_BYTES} bytes, past the end of the "
                     f"file (only {left} bytes follow the header)")
    lay = Layout(path, size, version, DEFAULT_ALIGNMENT)
    seen: dict[str, int] = {}
    for i in range(n_kv):
        kv = _read_kv(c, i)
        if kv.key in seen:
            raise c.fail(f"duplicate key {kv.key!r} (key/value pairs {seen[kv.key]} and {i}, "
                         f"the second at offset {kv.offset})")
        seen[kv.key] = i
        lay.kv.append(kv)
        if kv.key == "general.alignment":
            lay.alignment = _alignment(c, kv)
    lay.tensor_infos_offset = c.pos
    names: dict[str, int] = {}
    infos = []
    for i in range(n_tensors):
        info = _read_tensor_info(c, i)
        if info[0] in names:
            raise c.fail(f"duplicate tensor name {info[0]!r} (tensors {names[info[0]]} and {i}, "
                         f"the second at offset {info[4]})")
        names[info[0]] = i
        infos.append(info)
    lay.tensor_infos_end = c.pos
    lay.data_offset = _align(c.pos, lay.alignment)
    _place_tensors(c, lay, infos)
    return lay


def _read_kv(c: _Cursor, i: int) -> KVField:
    offset = c.pos
    key = c.text(f"key of key/value pair {i}")
    vtype = c.scalar("I", f"value type of key {key!r}")
    value_offset = c.pos
    if vtype not in VALUE_TYPES:
        raise c.fail(f"key {key!r}: unknown value type {vtype} at offset {value_offset - 4} "
                     f"(expected 0-{max(VALUE_TYPES)})")
    if vtype != ARRAY:
        _skip_value(c, key, vtype)
        return KVField(key, vtype, offset, value_offset, c.pos)
    item = c.scalar("I", f"item type of array {key!r}")
    if item not in VALUE_TYPES or item == ARRAY:
        raise c.fail(f"key {key!r}: array item type {item} at offset {value_offset} is not a valid "
                     f"scalar or string type (expected 0-{max(VALUE_TYPES)}, not {ARRAY}: nested arrays)")
    count = c.scalar("Q", f"length of array {key!r}")
    code = VALUE_TYPES[item][1]
    least = 8 if item == STRING else struct.calcsize(code)  # a string is at least its length field
    left = c.size - c.pos
    if count > left // least:
        raise c.fail(f"key {key!r}: array at offset {value_offset} claims {count} {VALUE_TYPES[item][0]} "
                     f"items, which need at least {count * least} bytes, but only {left} bytes are left in the file")
    if item == STRING:
        _skip_strings(c, key, count)
    else:
        c.need(count * least, f"array {key!r} of {count} {VALUE_TYPES[item][0]}")
    return KVField(key, ARRAY, offset, value_offset, c.pos, item, count)


_U64 = struct.Struct("<Q")


def _skip_strings(c: _Cursor, key: str, count: int) -> None:
    """count strings, each bounded and UTF-8, without _Cursor's per-string cost: a vocabulary is
    50k-250k of them and this walk must cost little beside gguf's own parse. First the lengths
    alone (bounds); then one UTF-8 decode of a copy of the whole run with each 8-byte length field
    zeroed: a NUL can neither continue a sequence nor be continued, so the run decodes exactly
    when every string does. On any failure _Cursor.text reads them again one by one, the first
    bad one raising the error that names it."""
    buf, size, start, unpack = c.buf, c.size, c.pos, _U64.unpack_from
    pos, fields = start, []
    for _ in range(count):
        if size - pos < 8:
            break
        n = unpack(buf, pos)[0]
        if n > size - pos - 8:
            break
        fields.append(pos - start)
        pos += 8 + n
    else:
        run = np.frombuffer(buf, np.uint8, pos - start, start).copy()  # uint8[run bytes]
        if fields:
            run[np.asarray(fields, dtype=np.int64)[:, None] + np.arange(8)] = 0  # [count, 8] indices
        try:
            str(memoryview(run), "utf-8")
            c.pos = pos
            return
        except UnicodeDecodeError:
            pass
    for j in range(count):
        c.text(f"string {j} of array {key!r}", key)


def _skip_value(c: _Cursor, key: str, vtype: int) -> None:
    if vtype == STRING:
        c.text("string value", key)
    else:
        c.need(struct.calcsize(VALUE_TYPES[vtype][1]), f"value of key {key!r}")


def _alignment(c: _Cursor, kv: KVField) -> int:
    if kv.vtype != 4:  # llama.cpp reads it with gguf_get_val_u32, which asserts the type
        raise c.fail(f"general.alignment at offset {kv.value_offset} has type {VALUE_TYPES[kv.vtype][0]}, "
                     f"expected UINT32")
    a = struct.unpack_from("<I", c.buf, kv.value_offset)[0]
    if a == 0 or a & (a - 1):
        raise c.fail(f"general.alignment is {a} (at offset {kv.value_offset}), expected a power of two")
    return a


def _read_tensor_info(c: _Cursor, i: int):
    """(name, ne[] in GGUF order, type id, relative offset, info offset, dims offset), checked."""
    info_offset = c.pos
    name = c.text(f"name of tensor {i}")
    if len(name.encode()) >= MAX_NAME:
        raise c.fail(f"tensor {i} name {name[:80]!r} at offset {info_offset} is {len(name.encode())} bytes, "
                     f"expected fewer than {MAX_NAME}")
    dims_offset = c.pos
    n_dims = c.scalar("I", f"n_dims of tensor {name}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise c.fail(f"tensor {name}: n_dims is {n_dims} at offset {dims_offset}, expected 1 to {MAX_DIMS}")
    ne = []
    for j in range(n_dims):
        at = c.pos
        d = c.scalar("q", f"dimension {j} of tensor {name}")
        if d <= 0:
            raise c.fail(f"tensor {name}: dimension {j} is {d} at offset {at}, expected a positive count")
        ne.append(d)
    n_elems = 1
    for d in ne:
        n_elems *= d
    if n_elems > INT64_MAX:
        raise c.fail(f"tensor {name}: shape {ne} (GGUF order) has {n_elems} elements, more than 2^63-1")
    at = c.pos
    type_id = c.scalar("I", f"type of tensor {name}")
    try:
        qtype = GGMLQuantizationType(type_id)
    except ValueError:
        raise c.fail(f"tensor {name} has unknown tensor type id {type_id} (at offset {at})") from None
    if qtype not in GGML_QUANT_SIZES:
        raise c.fail(f"tensor {name} has type {qtype.name} (id {type_id}) with no known block size")
    if qtype not in formats.SUPPORTED_TYPES:
        raise c.fail(f"tensor {name} has type {qtype.name}, which weightstream does not support "
                     f"(supported: {', '.join(sorted(q.name for q in formats.SUPPORTED_TYPES))})")
    block_elems, _ = GGML_QUANT_SIZES[qtype]
    if ne[0] % block_elems:
        raise c.fail(f"tensor {name} ({qtype.name}) has {ne[0]} columns, not a multiple of the block size "
                     f"{block_elems}")
    rel = c.scalar("Q", f"data offset of tensor {name}")
    return name, ne, qtype, rel, info_offset, dims_offset


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _place_tensors(c: _Cursor, lay: Layout, infos) -> None:
    """llama.cpp's rule: tensor k starts at the sum of the aligned sizes of tensors 0..k-1 (in
    table order), relative to the aligned start of the data section; all of it inside the file."""
    expected = 0
    lay.data_end = lay.data_offset
    for name, ne, qtype, rel, info_offset, dims_offset in infos:
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        n_elems = 1
        for d in ne:
            n_elems *= d
        nbytes = n_elems // block_elems * block_bytes
        if rel != expected:
            raise c.fail(f"tensor {name} has data offset {rel} (relative to the data section at "
                         f"{lay.data_offset}), expected {expected}: each tensor must start where the one before "
                         f"it in the table ends, padded to the alignment {lay.alignment} (no gap, overlap or "
                         f"misalignment)")
        start = lay.data_offset + rel
        if start + nbytes > lay.size:
            raise c.fail(f"truncated: tensor {name} at offset {start} needs {nbytes} bytes "
                         f"(to offset {start + nbytes}), but the file has only {lay.size} bytes")
        lay.tensors.append(TensorEntry(name, qtype, tuple(reversed(ne)), nbytes, start, info_offset, dims_offset))
        lay.data_end = start + nbytes
        expected = _align(expected + nbytes, lay.alignment)
