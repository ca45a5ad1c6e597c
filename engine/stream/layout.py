"""Where each layer's experts live in the file: the three stacked tensors ffn_{gate,up,down}_exps
[n_expert, rows, cols] of a MoE layer (expert e's slice of each starts at the tensor's offset + e *
its bytes per expert), or a dense FFN's three matrices taken as one expert (stream="ffn")."""
from __future__ import annotations

from dataclasses import dataclass

from .reader import region_bytes
from ..formats.gguf_file import GGUFError, GGUFFile, TensorInfo

EXPERT_TENSORS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
DENSE_FFN_TENSORS = ("ffn_gate", "ffn_up", "ffn_down")


@dataclass(frozen=True)
class ExpertLayout:
    """Where one layer's experts live: the stacked gate, up and down tensors [n_expert, rows, cols],
    or a dense FFN's three matrices [rows, cols] (stacked=False: one expert)."""

    layer: int
    parts: tuple[TensorInfo, TensorInfo, TensorInfo]
    stacked: bool = True

    @property
    def n_expert(self) -> int:
        return self.parts[0].shape[0] if self.stacked else 1

    def part_shape(self, i: int) -> tuple[int, int]:
        shape = self.parts[i].shape
        return tuple(shape[1:]) if self.stacked else tuple(shape)

    def part_bytes(self, i: int) -> int:
        """Bytes of one expert's slice of part i (its rows x row_bytes)."""
        return self.part_shape(i)[0] * self.parts[i].row_bytes

    @property
    def expert_bytes(self) -> int:
        return sum(self.part_bytes(i) for i in range(3))

    def slot_bytes(self, direct: bool) -> int:
        return sum(region_bytes(self.part_bytes(i), direct) for i in range(3))


def expert_layouts(f: GGUFFile, dense_ffn: bool = False) -> dict[int, ExpertLayout]:
    """{layer: layout} for every layer with routed experts, and with dense_ffn for every layer
    with a dense FFN too."""
    layouts = {}
    for name in f.tensors:
        if not name.startswith("blk."):
            continue
        layer = int(name.split(".")[1])
        if name.endswith(f".{EXPERT_TENSORS[0]}.weight"):
            parts = tuple(f.info(f"blk.{layer}.{t}.weight") for t in EXPERT_TENSORS)
            if len({p.shape[0] for p in parts}) != 1:
                raise GGUFError(f"{f.path}: layer {layer}'s expert tensors disagree on the expert count: "
                                f"{[p.shape for p in parts]}")
            layouts[layer] = ExpertLayout(layer, parts)
        elif dense_ffn and name.endswith(f".{DENSE_FFN_TENSORS[0]}.weight"):
            layouts[layer] = ExpertLayout(layer, tuple(f.info(f"blk.{layer}.{t}.weight") for t in DENSE_FFN_TENSORS),
                                          stacked=False)
    return layouts
