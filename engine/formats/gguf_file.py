"""Open a GGUF file (or a set of split shards) as llama.cpp writes it.

Each file's structure is first checked by gguf_header.read_layout (bounded: counts and lengths
against the bytes left, llama.cpp's tensor-offset rule; non-regular files refused before any
open); parsing is then done by the `gguf` package (llama.cpp's own). This module adds what the
engine needs on top: one metadata dict, a tensor index with absolute byte ranges (the streaming
reader reads those), shape checks, split-shard discovery, and clear errors for files that are
truncated, corrupt or incomplete.
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType

from ...kernels import QTensor, formats
from ..errors import GGUFError
from .gguf_header import Layout, read_layout

SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. shape is in NumPy order (outermost first): a weight matrix is
    (rows, cols), a stacked expert tensor (n_expert, rows, cols); GGUF's own ne[] is reversed."""

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    path: Path
    offset: int  # absolute byte offset of the first block in `path`
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return formats.row_bytes(self.qtype, self.shape[-1])


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split model given any one of them (or [path] for a single file)."""
    m = SPLIT_NAME.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    paths = [path.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"missing shard {p.name} of split model {paths[0].name} "
                                    f"({count} shards expected in {p.parent})")
    return paths


class _CheckedReader(GGUFReader):
    """GGUFReader with a one-step parse of arrays (below). It runs only on files read_layout has
    checked, so its own bounds checks are a second line, not the first."""

    def __init__(self, path: Path):
        self._path = path
        super().__init__(path, "r")

    def _get_field_parts(self, orig_offs: int, raw_type: int):
        """Arrays in one step. gguf's reader makes two memmap views per array element, which for a
        tokenizer's 50k-150k strings takes seconds (most of a small model's load time). Same
        result shape: parts [item type, length, items...], data = the indices of the values, so
        ReaderField.contents() reads them as before (a scalar array is one part: all values)."""
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I":
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        alen = self._get(orig_offs + 4, np.uint64)
        itype, count, offs = int(raw_itype[0]), int(alen[0]), orig_offs + 12
        nptype = self.gguf_scalar_to_np.get(GGUFValueType(itype)) if itype in GGUFValueType._value2member_map_ else None
        types = [GGUFValueType.ARRAY] + ([GGUFValueType(itype)] if count else [])
        if nptype is not None:
            values = self._get(offs, nptype, count)
            if len(values) != count:
                raise ValueError(f"array of {count} {GGUFValueType(itype).name} at offset {orig_offs} runs past the end")
            return 12 + int(values.nbytes), [raw_itype, alen, values], [2], types
        if itype != GGUFValueType.STRING:
            return super()._get_field_parts(orig_offs, raw_type)
        data, size = memoryview(self.data).cast("B"), len(self.data)
        parts, idxs = [raw_itype, alen], []
        for _ in range(count):  # each string: uint64 length, then its bytes
            if offs + 8 > size:
                raise ValueError(f"string array at offset {orig_offs} runs past the end of the file")
            n = int.from_bytes(data[offs:offs + 8], "little")
            if offs + 8 + n > size:
                raise ValueError(f"string of {n} bytes at offset {offs} runs past the end of the file")
            parts += (data[offs:offs + 8], data[offs + 8:offs + 8 + n])
            idxs.append(len(parts) - 1)
            offs += 8 + n
        return offs - orig_offs, parts, idxs, types


def _open_reader(path: Path) -> tuple[Layout, GGUFReader]:
    """The file's checked layout (gguf_header.read_layout: bounded, before anything is allocated),
    then gguf's reader over a structure known to be sound."""
    layout = read_layout(path)
    try:
        reader = _CheckedReader(path)
    except (ValueError, IndexError, KeyError, struct.error, OSError, OverflowError) as e:
        raise GGUFError(f"{path}: corrupt or truncated GGUF ({layout.size} bytes): {e}") from e
    if len(reader.tensors) != len(layout.tensors):  # both parse the same bytes: a bug if they differ
        raise GGUFError(f"{path}: gguf's reader found {len(reader.tensors)} tensors, the header check "
                        f"{len(layout.tensors)}")
    return layout, reader


class GGUFFile:
    """A GGUF model: metadata (from the first shard) and the index of tensors across all shards."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.paths = shard_paths(self.path)
        opened = [_open_reader(p) for p in self.paths]
        self._readers = [r for _, r in opened]
        first = self._readers[0]
        self.metadata: dict[str, Any] = {k: f.contents() for k, f in first.fields.items()
                                         if not k.startswith("GGUF.")}
        self._check_split_keys()
        self.tensors: dict[str, TensorInfo] = {}
        self._arrays: dict[str, np.ndarray] = {}
        # called with the byte count of every tensor copied into memory (raw(copy=True)): a load's
        # progress bar (Engine.load(progress=True)); None: nothing to tell
        self.on_copy: Callable[[int], None] | None = None
        for p, (layout, reader) in zip(self.paths, opened):
            self._index(p, layout, reader)

    def _check_split_keys(self) -> None:
        declared = self.metadata.get("split.count")
        if declared is not None and int(declared) != len(self.paths):
            raise GGUFError(f"{self.path}: metadata says split.count={declared}, but the file name "
                            f"gives {len(self.paths)} shard(s)")

    def _index(self, path: Path, layout: Layout, reader: GGUFReader) -> None:
        """Names, types, shapes and byte ranges from the checked layout; the reader's memory-map
        views (which must lie at the same offsets) for raw()."""
        for entry, t in zip(layout.tensors, reader.tensors):
            if t.name != entry.name or int(t.data_offset) != entry.offset or int(t.n_bytes) != entry.nbytes:
                raise GGUFError(f"{path}: tensor {entry.name}: gguf's reader places it at offset "
                                f"{int(t.data_offset)} ({int(t.n_bytes)} bytes), the header check at "
                                f"{entry.offset} ({entry.nbytes} bytes)")
            if entry.name in self.tensors:  # across shards (within one file read_layout refuses it)
                raise GGUFError(f"{path}: duplicate tensor {entry.name}: also in {self.tensors[entry.name].path}")
            self.tensors[entry.name] = TensorInfo(entry.name, entry.qtype, entry.shape, path, entry.offset,
                                                  entry.nbytes)
            self._arrays[entry.name] = t.data

    # ---- access -------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"{self.path}: tensor {name} not found") from None

    def raw(self, name: str, copy: bool = False) -> np.ndarray:
        """The tensor's block bytes as uint8[..., rows, bytes_per_row]: a read-only view of the
        file, or with copy=True our own copy, read with pread so that no page of the file's
        memory map becomes part of the process (what a memory budget needs)."""
        info = self.info(name)
        if not copy:
            return self._arrays[name].view(np.uint8).reshape(*info.shape[:-1], info.row_bytes)
        out = np.empty(info.nbytes, dtype=np.uint8)
        fd = os.open(info.path, os.O_RDONLY)
        try:
            got = 0
            while got < info.nbytes and (n := os.preadv(fd, [out[got:]], info.offset + got)) > 0:
                got += n
        finally:
            os.close(fd)
        if got != info.nbytes:
            raise GGUFError(f"{info.path}: tensor {name} at offset {info.offset}: read {got} of {info.nbytes} "
                            f"bytes (file truncated?)")
        if self.on_copy is not None:
            self.on_copy(info.nbytes)
        return out.reshape(*info.shape[:-1], info.row_bytes)

    def qtensor(self, name: str, expect_shape: tuple[int, ...] | None = None, copy: bool = False) -> QTensor:
        """A 2-D weight; with expect_shape, its (rows, cols) is checked against the model config;
        copy: see raw()."""
        info = self.info(name)
        self._check_shape(info, expect_shape)
        if len(info.shape) != 2:
            raise GGUFError(f"{self.path}: tensor {name} has shape {info.shape}, expected a 2-D matrix")
        return QTensor(info.qtype, info.shape, self.raw(name, copy))

    def expert_qtensors(self, name: str, expect_shape: tuple[int, int, int] | None = None) -> list[QTensor]:
        """A stacked [n_expert, rows, cols] tensor as one QTensor per expert (views, no copies)."""
        info = self.info(name)
        self._check_shape(info, expect_shape)
        if len(info.shape) != 3:
            raise GGUFError(f"{self.path}: tensor {name} has shape {info.shape}, expected [n_expert, rows, cols]")
        raw = self.raw(name)
        return [QTensor(info.qtype, info.shape[1:], raw[e]) for e in range(info.shape[0])]

    def array(self, name: str, expect_shape: tuple[int, ...] | None = None, copy: bool = False) -> np.ndarray:
        """Any tensor dequantized to float32, in NumPy shape order (norms, biases, small tensors)."""
        from ...kernels import reference

        info = self.info(name)
        self._check_shape(info, expect_shape)
        rows = int(np.prod(info.shape[:-1])) if len(info.shape) > 1 else 1
        raw = self.raw(name, copy).reshape(rows, info.row_bytes)
        return reference.dequantize(raw, info.qtype, (rows, info.shape[-1])).reshape(info.shape)

    def _check_shape(self, info: TensorInfo, expect: tuple[int, ...] | None) -> None:
        if expect is not None and tuple(expect) != info.shape:
            raise GGUFError(f"{self.path}: tensor {info.name} has shape {list(info.shape)}, "
                            f"expected {list(expect)} from the model's metadata")

    def populate(self) -> bool:
        """Map every page of the file into this process now (madvise MADV_POPULATE_READ: llama.cpp's
        MAP_POPULATE), reading from disk what the page cache lacks. A weight used straight from the
        memory map otherwise costs a page fault per 4 KiB on first touch, which in a VM made a
        decode step of a 12 GB MoE ~10x slower than its bytes need. Returns False where the kernel
        (before Linux 5.14) cannot: nothing is lost but the speed."""
        advice = getattr(mmap, "MADV_POPULATE_READ", 22)  # Python < 3.13 does not name it
        for r in self._readers:
            mm = getattr(getattr(r, "data", None), "_mmap", None)
            if mm is None or mm.closed or not hasattr(mm, "madvise"):
                return False
            try:
                mm.madvise(advice)
            except OSError:
                return False
        return True

    def release_pages(self) -> None:
        """Drop the memory map's pages from this process and the file's pages from the page cache
        (after load, when every weight we keep has been copied and the rest streams with pread)."""
        for r, path in zip(self._readers, self.paths):
            mm = getattr(getattr(r, "data", None), "_mmap", None)
            if mm is not None and not mm.closed and hasattr(mm, "madvise"):
                mm.madvise(mmap.MADV_DONTNEED)
            if hasattr(os, "posix_fadvise"):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)

    def release_parse(self) -> None:
        """Drop gguf's parsed fields (GGUFReader.fields: every array element as its own NumPy views,
        ~45 MiB for a 49k-token vocabulary with its merges) and tensor records (.tensors: their
        fields' views): self.metadata and self.tensors hold their values, and nothing here reads
        them after opening. What needs each key's GGUF type (quantize's metadata copy) must read
        them before (engine/stream/budget.py release_parsed_fields calls this in Engine.load)."""
        for reader in self._readers:
            reader.fields = type(reader.fields)()
            reader.tensors = type(reader.tensors)()

    def close(self) -> None:
        self._arrays.clear()
        for r in self._readers:
            mm = getattr(r, "data", None)
            if mm is not None and hasattr(mm, "_mmap") and mm._mmap is not None:
                try:
                    mm._mmap.close()
                except (BufferError, ValueError):
                    pass  # views still alive elsewhere; the mapping goes when they do
        self._readers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
