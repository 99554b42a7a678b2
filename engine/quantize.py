"""Symmetric per-group int8 weight quantization, arithmetic-identical to DeepSpeed's `WeightQuantization`.

What DeepSpeed does (deepspeed.md §5.3, `deepspeed/runtime/weight_quantizer.py`) and this module reproduces bit
for bit: flatten to float32, cut into groups of `numel // groups` elements (one extra short group when it does
not divide), per group `scale = 2**bits / (2*max|x| + 1e-5)`, `q = clamp(round(x*scale))` stored as int8.
MLP-shaped weights get `2*groups` (`is_mlp`, a shape-ratio test; off with `mlp_extra_grouping=False`).
Only the four per-layer matrices are quantized, and their dequantization multipliers (`1/scale`, so
`weight ≈ int8 * multiplier`) are stored per layer as rows `[qkv, dense, h4h, 4hh]`, zero-padded to the widest
row and stacked to `[layers, 4, width]`.

Merges (`parts` = source ranks merged into one target rank): DeepSpeed quantizes every source shard on its
own and concatenates the multipliers along the merge dim (row-parallel `dense`/`4h_to_h` merge on dim 1, so
their multipliers interleave: `cat(dim=1).view(-1)`). Here the target tensor is cut into `parts` equal chunks
along that dim and each chunk is quantized the same way: where a merge is a plain concatenation the chunks are
the source shards, so the result is DeepSpeed's; where it is not (v0 QKV regrouping, SwiGLU halves, which
DeepSpeed gets wrong) the int8 groups are still contiguous runs of the correct merged tensor.

Splits (DeepSpeed crashes in `merge_scales_split`): every target rank is quantized on its own, as one part, with
`mp_size` = the target TP degree. That is exactly what DeepSpeed's identity load of a native checkpoint at the
target TP produces, so a split rank file equals DeepSpeed quantizing the checkpoint it should have written.

The scales travel in each written rank file under the top-level key `QUANT_ENTRY` (a plain dict, see
`quantize_module`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

QUANT_ENTRY = "ckpt_explorer_quantization"  # top-level key of a quantized rank file
SCALE_ROWS = ("qkv", "dense", "h4h", "4hh")  # row order of the per-layer scales (DeepSpeed's merge_scales)
ENTRY_FORMAT = 1
# fields of the QUANT_ENTRY dict
F_FORMAT, F_BITS, F_GROUPS, F_MLP = "format", "bits", "groups", "mlp_extra_grouping"
F_MP, F_MERGE, F_ROWS, F_SCALES, F_KEYS = "mp_size", "merge_count", "rows", "scales", "quantized_keys"

# Which weights are quantized and into which row; DeepSpeed's substring tests (legacy names, its order of
# precedence) plus the Megatron-Core equivalents. Expert weights are not quantized (DeepSpeed has no rule).
_SLOTS: tuple[tuple[str, int], ...] = (
    (r"mlp\.dense_4h_to_h\.weight$", 3),
    (r"mlp\.dense_h_to_4h\.weight$", 2),
    (r"(self_|inter_)?attention\.query_key_value\.weight$", 0),
    (r"(self_|inter_)?attention\.dense\.weight$", 1),
    (r"mlp\.linear_fc2\.weight$", 3),
    (r"mlp\.linear_fc1\.weight$", 2),
    (r"(self_attention\.)?linear_qkv\.weight$", 0),
    (r"(self_attention\.)?linear_proj\.weight$", 1),
)
ROW_PARALLEL_SLOTS = (1, 3)  # dense and 4h_to_h merge on dim 1


def scale_slot(name: str) -> tuple[int, str] | None:
    """(row in SCALE_ROWS, layer prefix) for a weight that gets quantized, else None."""
    for pattern, slot in _SLOTS:
        m = re.search(pattern, name)
        if m is not None and (m.start() == 0 or name[m.start() - 1] == "."):
            return slot, name[: m.start()]
    return None


def is_mlp(shape: tuple[int, ...], *, mp_size: int, merge_count: int = 1) -> bool:
    """DeepSpeed's MLP test: `mp_size*rows*merge_count/cols == 4`, or the same with rows and cols swapped."""
    rows, cols = int(shape[0]), int(shape[1])
    return (mp_size * rows * merge_count) / cols == 4 or (mp_size * cols * merge_count) / rows == 4


def quantize_data(t: torch.Tensor, bits: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 tensor of `t`'s shape, quantization scales `[pieces, 1]` float32), DeepSpeed's exact arithmetic.

    Pieces hold `numel // groups` elements; when that does not divide `numel` one more, shorter piece
    follows. `q = clamp(round(x * scale))`, so `x ≈ q / scale`.
    """
    import torch

    if bits < 2 or bits > 8:
        raise ValueError(f"quantization to {bits} bits is not supported (int8 storage: 2..8)")
    flat = t.float().reshape(-1)
    n = flat.numel()
    size = n // groups if groups > 0 else 0
    if size == 0:
        raise ValueError(f"cannot cut {n} elements into {groups} groups")
    full = (n // size) * size
    blocks = [flat[:full].view(-1, size)]
    if full < n:
        blocks.append(flat[full:].view(1, -1))
    qs, scales = [], []
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    for b in blocks:
        mx = torch.maximum(b.amax(dim=1), b.amin(dim=1).abs())
        scale = float(1 << bits) / (2 * mx + 1e-5)
        qs.append((b * scale.unsqueeze(1)).round().clamp(lo, hi).reshape(-1))
        scales.append(scale)
    q = torch.cat(qs).reshape(t.shape).to(torch.int8)
    return q, torch.cat(scales).unsqueeze(1)


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized weight: int8 values and its dequantization multipliers in DeepSpeed's order."""

    q: torch.Tensor  # int8, the weight's shape
    multipliers: torch.Tensor  # 1-D float32: weight ≈ q * multiplier of its group
    groups: int  # groups requested per part (MLP extra grouping applied)
    parts: int  # equal chunks along merge_dim, each quantized on its own
    merge_dim: int

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.q, self.multipliers, groups=self.groups, parts=self.parts, merge_dim=self.merge_dim)


def _chunks(t: torch.Tensor, parts: int, dim: int) -> list[torch.Tensor]:
    import torch

    if parts < 1 or t.shape[dim] % parts:
        raise ValueError(f"dim {dim} of size {t.shape[dim]} does not cut into {parts} equal parts")
    return list(torch.chunk(t, parts, dim=dim))


def quantize_tensor(t: torch.Tensor, *, bits: int = 8, groups: int = 64, parts: int = 1, merge_dim: int = 0,
                    mp_size: int = 1, mlp_extra_grouping: bool = True) -> QuantizedTensor:
    """Quantize a 2-D weight as DeepSpeed's `Quantize(value_list, ..., merge_dim)` does for `parts` shards."""
    import torch

    if t.dim() != 2:
        raise ValueError(f"only 2-D weights are quantized (got {tuple(t.shape)})")
    chunks = _chunks(t, parts, merge_dim)
    g = groups * 2 if mlp_extra_grouping and is_mlp(tuple(chunks[0].shape), mp_size=mp_size,
                                                     merge_count=parts) else groups
    done = [quantize_data(c, bits, g) for c in chunks]
    q = torch.cat([d[0] for d in done], dim=merge_dim)
    mult = (1 / torch.cat([d[1] for d in done], dim=merge_dim)).reshape(-1)
    return QuantizedTensor(q, mult, g, parts, merge_dim)


def dequantize(q: torch.Tensor, multipliers: torch.Tensor, *, groups: int | None = None, parts: int = 1,
               merge_dim: int = 0) -> torch.Tensor:
    """float32 weight from int8 values and multipliers laid out as `quantize_tensor` writes them.

    `groups` is the group count per part; without it the pieces are assumed equal (`numel` divides).
    """
    import torch

    mult = multipliers.reshape(-1).float()
    if mult.numel() % parts:
        raise ValueError(f"{mult.numel()} multipliers do not split into {parts} parts")
    pieces = mult.numel() // parts
    per_part = mult.view(parts, pieces) if merge_dim == 0 or parts == 1 else mult.view(pieces, parts).t()
    out = []
    for p, chunk in enumerate(_chunks(q, parts, merge_dim)):
        n = chunk.numel()
        size = n // groups if groups else n // pieces
        if size == 0 or -(-n // size) != pieces or (groups is None and n % pieces):
            raise ValueError(f"{pieces} multipliers per part do not fit a {tuple(chunk.shape)} part"
                             + ("" if groups else " (pass groups=)"))
        flat, full = chunk.float().reshape(-1), (n // size) * size
        back = [flat[:full].view(-1, size) * per_part[p][: n // size].unsqueeze(1)]
        if full < n:
            back.append(flat[full:].view(1, -1) * per_part[p][-1])
        out.append(torch.cat([b.reshape(-1) for b in back]).reshape(chunk.shape))
    return torch.cat(out, dim=merge_dim)


def dequant_error(original: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, *, groups: int | None = None,
                  parts: int = 1, merge_dim: int = 0) -> tuple[float, float]:
    """(max abs error, mean abs error) of dequantizing `q` with multipliers `scales` against `original`."""
    back = dequantize(q, scales, groups=groups, parts=parts, merge_dim=merge_dim)
    diff = (back - original.float()).abs()
    return float(diff.max()), float(diff.mean())


def merge_count_for(src_tp: int, dst_tp: int) -> int:
    """How many source ranks one target rank merges (1 for identity and splits)."""
    return src_tp // dst_tp if src_tp > dst_tp and src_tp % dst_tp == 0 else 1


def quantize_module(module: Mapping[str, torch.Tensor], *, mp_size: int, merge_count: int = 1, bits: int = 8,
                    groups: int = 64, mlp_extra_grouping: bool = True,
                    merge_dims: Mapping[str, int] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Quantize one target rank's module dict; returns (new module, the QUANT_ENTRY dict).

    `mp_size` is the target TP degree and `merge_count` the source ranks merged into this rank (1 for identity
    and splits). `merge_dims` overrides the dim a weight's parts lie on (default: 1 for dense/4h_to_h).
    The entry: `{format, bits, groups, mlp_extra_grouping, mp_size, merge_count, rows: SCALE_ROWS,
    scales: float32 [layers, 4, width] multipliers (zero-padded), quantized_keys: [{name, layer, row, groups,
    parts, merge_dim, count}]}` — `count` is the number of multipliers of that weight in its row.
    """
    import torch

    out: dict[str, Any] = dict(module)
    layers: dict[str, list[torch.Tensor | None]] = {}
    keys: list[dict[str, Any]] = []
    for name, t in module.items():
        hit = scale_slot(name)
        if hit is None:
            continue
        slot, prefix = hit
        dim = (merge_dims or {}).get(name, 1 if slot in ROW_PARALLEL_SLOTS else 0)
        qt = quantize_tensor(t, bits=bits, groups=groups, parts=merge_count, merge_dim=dim, mp_size=mp_size,
                             mlp_extra_grouping=mlp_extra_grouping)
        row = layers.setdefault(prefix, [None] * len(SCALE_ROWS))
        if row[slot] is not None:
            raise ValueError(f"{name}: layer {prefix!r} already has a {SCALE_ROWS[slot]} weight")
        row[slot] = qt.multipliers
        out[name] = qt.q
        keys.append({"name": name, "layer": list(layers).index(prefix), "row": slot, "groups": qt.groups,
                     "parts": qt.parts, "merge_dim": dim, "count": int(qt.multipliers.numel())})
    width = max((int(m.numel()) for row in layers.values() for m in row if m is not None), default=0)
    scales = torch.zeros(len(layers), len(SCALE_ROWS), width, dtype=torch.float32)
    for i, row in enumerate(layers.values()):
        for j, m in enumerate(row):
            if m is not None:
                scales[i, j, : m.numel()] = m
    entry = {F_FORMAT: ENTRY_FORMAT, F_BITS: bits, F_GROUPS: groups, F_MLP: mlp_extra_grouping, F_MP: mp_size,
             F_MERGE: merge_count, F_ROWS: list(SCALE_ROWS), F_SCALES: scales, F_KEYS: keys}
    return out, entry


def entry_multipliers(entry: Mapping[str, Any], name: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The exact multiplier vector of quantized weight `name` in a QUANT_ENTRY dict, and its key record."""
    for rec in entry[F_KEYS]:
        if rec["name"] == name:
            return entry[F_SCALES][rec["layer"], rec["row"], : rec["count"]], rec
    raise KeyError(name)


def dequantize_entry(entry: Mapping[str, Any], name: str, q: torch.Tensor) -> torch.Tensor:
    """float32 weight `name` from its int8 tensor and the rank file's QUANT_ENTRY."""
    mult, rec = entry_multipliers(entry, name)
    return dequantize(q, mult, groups=rec["groups"], parts=rec["parts"], merge_dim=rec["merge_dim"])
