"""Requantize a GGUF with a file-type recipe: `weightstream quantize IN.gguf OUT.gguf q2_k [--imatrix F]`.

What llama-quantize does, tensor by tensor: every tensor of the input (any type we read) is
expanded to float32 (kernels.dequantize, bit-identical to gguf's dequantizers) and quantized to the
type engine/tools/recipes.py gives it, weighting the error by the importance matrix when one is given
(engine/tools/imatrix.py; for a 3-D expert tensor, each expert by its own row of the matrix). A tensor
whose type does not change is copied byte for byte, as llama.cpp does ("nothing to do"): a Q4_1
tensor kept in Q4_1 loses nothing. At most one tensor's output bytes and one expert's (or one
row chunk's) float32 values are in memory at a time.

All key/value pairs are copied (tokenizer, chat template, hyperparameters) except split.* keys
and a previous quantize.imatrix.*; general.file_type becomes the recipe's LlamaFileType,
`weightstream.quantize.recipe` names the recipe, and with an importance matrix llama.cpp's keys
quantize.imatrix.file / .dataset / .entries_count / .chunks_count (tools/quantize/quantize.cpp)
record where it came from. The file is written under a temporary name and renamed when complete
(engine/formats/atomic.py gguf_output); a failure leaves nothing behind.
"""
from __future__ import annotations

import os
from pathlib import Path
import gguf
import numpy as np
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType

from ... import kernels
from ...kernels import QTensor, formats, quantize_weights

from . import recipes
from .imatrix import read_imatrix
from ..formats.atomic import gguf_output
from ..formats.gguf_file import GGUFFile

RECIPE_KEY = "weightstream.quantize.recipe"
# llama.cpp's keys (src/llama-arch.cpp LLM_KV_QUANTIZE_IMATRIX_*), written by llama-quantize
IMATRIX_FILE_KEY = "quantize.imatrix.file"
IMATRIX_DATASET_KEY = "quantize.imatrix.dataset"
IMATRIX_N_ENTRIES_KEY = "quantize.imatrix.entries_count"
IMATRIX_N_CHUNKS_KEY = "quantize.imatrix.chunks_count"
# keys not copied from the input: llama-quantize drops split.*; the rest we write ourselves
DROPPED_KEYS = ("split.no", "split.count", "split.tensors.count", IMATRIX_FILE_KEY, IMATRIX_DATASET_KEY,
                IMATRIX_N_ENTRIES_KEY, IMATRIX_N_CHUNKS_KEY, RECIPE_KEY)

CHUNK_ELEMENTS = 1 << 24  # float32 values expanded at once for a 2-D tensor (64 MiB)
DENSE = (QT.F32, QT.F16, QT.BF16)


# ----------------------------------------------------------------------------------------------
# quantizing arrays


def quantize_rows(w: np.ndarray, qtype: QT, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32[rows, cols] -> uint8[rows, row_bytes] of qtype: the block types through
    weightstream.kernels.quantize_weights (imatrix: float32[cols], each column's importance), F32 / F16 / BF16
    through gguf."""
    w = np.ascontiguousarray(w, dtype=np.float32)
    if qtype == QT.F32:
        return w.view(np.uint8).reshape(w.shape[0], -1)
    if qtype in DENSE:
        return gguf.quants.quantize(w, qtype).view(np.uint8).reshape(w.shape[0], -1)
    return quantize_weights.quantize(w, qtype, imatrix)


def quantize_array(data: np.ndarray, qtype: QT, imatrix: np.ndarray | None = None, name: str = "tensor") -> np.ndarray:
    """A whole tensor (1-D, 2-D, or 3-D experts [n_expert, rows, cols]) as uint8 block bytes
    [..., row_bytes]; an expert tensor is quantized expert by expert, with imatrix
    float32[n_expert * cols] (one row per expert, llama.cpp's layout) or float32[cols]."""
    shape = data.shape
    cols = shape[-1]
    rows = data.reshape(-1, cols)
    n_mat = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    weights = _imatrix_rows(imatrix, n_mat, cols, name) if imatrix is not None and qtype not in DENSE else None
    out = np.empty((rows.shape[0], formats.row_bytes(qtype, cols)), dtype=np.uint8)
    per = rows.shape[0] // n_mat
    for e in range(n_mat):
        out[e * per:(e + 1) * per] = quantize_rows(rows[e * per:(e + 1) * per], qtype,
                                                   None if weights is None else weights[e])
    return out.reshape(*shape[:-1], out.shape[-1])


def _imatrix_rows(imatrix: np.ndarray, n_mat: int, cols: int, name: str) -> np.ndarray:
    """float32[n_mat, cols]: the importance of each column for each matrix of a tensor."""
    imatrix = np.asarray(imatrix, dtype=np.float32).reshape(-1)
    if imatrix.size == cols:
        return np.broadcast_to(imatrix, (n_mat, cols))
    if imatrix.size == n_mat * cols:
        return imatrix.reshape(n_mat, cols)
    raise ValueError(f"imatrix entry for {name} has {imatrix.size} values; the tensor needs {cols} per "
                     f"matrix ({n_mat} x {cols}): the imatrix was computed on a different model")


# ----------------------------------------------------------------------------------------------
# requantizing a GGUF


def quantize_gguf(in_path: str | os.PathLike, out_path: str | os.PathLike, ftype: str,
                  imatrix: str | os.PathLike | dict | None = None, progress: bool = True,
                  threads: int | None = None) -> Path:
    """Requantize the GGUF at in_path (any shard of a split model) into one file at out_path with
    the recipe `ftype` (q2_k, q3_k_m, q4_k_m, q8_0). imatrix: an imatrix file path (llama.cpp's
    legacy .dat or GGUF format; engine/tools/imatrix.py) or a dict name -> float32 values. Returns the
    path written."""
    recipe = recipes.get_recipe(ftype)
    in_path, out_path = Path(in_path), Path(out_path)
    if not out_path.parent.is_dir():
        raise FileNotFoundError(f"output directory {out_path.parent} does not exist")
    if out_path.resolve() == in_path.resolve():
        raise ValueError(f"{out_path}: the output must not overwrite the input")
    im_info = None
    if isinstance(imatrix, (str, os.PathLike)):
        im_info = read_imatrix(imatrix)
        im_values = im_info.values
    else:
        im_values = imatrix
    with GGUFFile(in_path) as f:
        arch = f.metadata.get("general.architecture")
        if not arch:
            raise ValueError(f"{in_path}: no general.architecture")
        shape = recipes.ModelShape.from_metadata(f.metadata)
        types = recipes.tensor_types(recipe, [(n, t.shape) for n, t in f.tensors.items()], shape)
        if im_values is not None:
            _check_imatrix(im_values, f, types)
        plan = [(f.tensors[n], types[n]) for n in f.tensors]
        with gguf_output(out_path, arch) as (writer, tmp_path):
            for info, qtype in plan:
                nbytes = int(np.prod(info.shape[:-1], dtype=np.int64)) * formats.row_bytes(qtype, info.shape[-1])
                writer.add_tensor_info(info.name, info.shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
            _copy_metadata(writer, f, recipe, imatrix, im_info, im_values)
            writer.write_header_to_file(tmp_path)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=sum(i.nbytes for i, _ in plan), unit="B", unit_scale=True, desc=out_path.name)
            for info, qtype in plan:
                if bar is not None:
                    bar.set_postfix_str(f"{info.name} -> {qtype.name}", refresh=False)
                weights = None if im_values is None else im_values.get(info.name)
                writer.write_tensor_data(_requantize(f, info, qtype, weights, threads))
                if bar is not None:
                    bar.update(info.nbytes)
            if bar is not None:
                bar.close()
    return out_path


def _requantize(f: GGUFFile, info, qtype: QT, imatrix: np.ndarray | None, threads: int | None) -> np.ndarray:
    """uint8[..., row_bytes] of one tensor in qtype: its bytes when the type is unchanged, else
    expanded (an expert, or CHUNK_ELEMENTS values, at a time) and quantized."""
    raw = f.raw(info.name)  # uint8[..., rows, row_bytes], a view of the file
    if qtype == info.qtype:
        return np.ascontiguousarray(raw)
    cols = info.shape[-1]
    rows = raw.reshape(-1, raw.shape[-1])
    n_mat = int(np.prod(info.shape[:-2])) if len(info.shape) > 2 else 1
    per = rows.shape[0] // n_mat  # rows of one matrix (one expert)
    weights = _imatrix_rows(imatrix, n_mat, cols, info.name) if imatrix is not None and qtype not in DENSE else None
    out = np.empty((rows.shape[0], formats.row_bytes(qtype, cols)), dtype=np.uint8)
    step = max(1, min(per, CHUNK_ELEMENTS // cols))
    for e in range(n_mat):
        for r in range(e * per, (e + 1) * per, step):
            r1 = min(r + step, (e + 1) * per)
            w = kernels.dequantize(QTensor(info.qtype, (r1 - r, cols), rows[r:r1]), threads)  # float32[r1-r, cols]
            out[r:r1] = quantize_rows(w, qtype, None if weights is None else weights[e])
    return out.reshape(*info.shape[:-1], out.shape[-1])


def _check_imatrix(values: dict, f: GGUFFile, types: dict) -> None:
    """llama.cpp's rule: an entry whose size does not match its tensor is an error (the imatrix is
    from another model), except for token_embd."""
    for name, v in values.items():
        if name not in f.tensors or name == "token_embd.weight" or types[name] in DENSE:
            continue
        shape = f.tensors[name].shape
        n_mat = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
        if np.asarray(v).size not in (shape[-1], n_mat * shape[-1]):
            raise ValueError(f"imatrix entry {name} has {np.asarray(v).size} values, the tensor "
                             f"{list(shape)} needs {n_mat * shape[-1]}: computed on a different model?")
        if not np.all(np.isfinite(v)):
            raise ValueError(f"imatrix entry {name} has non-finite values")


def _copy_metadata(writer: gguf.GGUFWriter, f: GGUFFile, recipe: recipes.Recipe, imatrix, im_info,
                   im_values) -> None:
    """Every key/value pair of the input with its own GGUF type, in the input's order; the
    recipe's file type replacing general.file_type."""
    reader = f._readers[0]
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture" or key in DROPPED_KEYS:
            continue
        vtype = field.types[0]
        if key == "general.file_type":
            writer.add_key_value(key, int(recipe.file_type), GGUFValueType.UINT32)
            continue
        sub = field.types[1] if vtype == GGUFValueType.ARRAY and len(field.types) > 1 else None
        value = field.contents()
        if vtype == GGUFValueType.ARRAY and sub is None:  # an empty array: its item type is in the data
            sub = GGUFValueType(int(field.parts[0][0]))
        writer.add_key_value(key, value, vtype, sub)
    if "general.file_type" not in reader.fields:
        writer.add_file_type(recipe.file_type)
    if "general.quantization_version" not in reader.fields:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_recipe_keys(writer, recipe, imatrix, im_info, im_values)


def write_recipe_keys(writer: gguf.GGUFWriter, recipe: recipes.Recipe, imatrix, im_info, im_values) -> None:
    """weightstream.quantize.recipe, and llama-quantize's quantize.imatrix.* keys when an
    importance matrix was used (imatrix: its path, or a dict given in memory)."""
    writer.add_string(RECIPE_KEY, recipe.name)
    if im_values is not None:
        writer.add_string(IMATRIX_FILE_KEY, str(imatrix) if isinstance(imatrix, (str, os.PathLike)) else "<in memory>")
        if im_info is not None and im_info.dataset:
            writer.add_string(IMATRIX_DATASET_KEY, im_info.dataset)
        # llama-quantize writes these two through its int overrides, which llama.cpp stores as u32
        writer.add_uint32(IMATRIX_N_ENTRIES_KEY, len(im_values))
        if im_info is not None and im_info.chunks > 0:
            writer.add_uint32(IMATRIX_N_CHUNKS_KEY, im_info.chunks)


# ----------------------------------------------------------------------------------------------
# command line


