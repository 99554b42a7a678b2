"""Fused QKV merge and split for every Megatron row layout (checkpoint_version 0, 1.0, 2.0/3.0, grouped-query).

Rows of a TP rank's fused QKV weight (and of its 1-D bias), with np = heads per rank, hn = head dim:

* v0 (no `checkpoint_version`): `[3, np, hn]`, i.e. `[Q_r; K_r; V_r]` blocks. Merging regroups the blocks
  (all ranks' Q, then all K, then all V); splitting cuts each of Q, K, V and re-fuses per rank.
* v1.0: `[np, hn, 3]`; v2.0 and v3.0: `[np, 3, hn]`. Heads are outermost, so merge is `cat(dim 0)` and
  split is an even dim-0 chunk; a chunk must hold whole heads.
* Megatron-Core `linear_qkv` (`qkv_version` None): per query group `[q x np/ng, k, v]`, groups outermost
  (multi-head attention is the case ng = np). Merge is `cat(dim 0)`; a split must hold whole groups.

Splits that would cut a head or a query group raise ValueError (a Megatron model could not load them).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from .rules import TpSpec

V0, V1, HEADS, GROUPS = "v0 [3,np,hn]", "v1.0 [np,hn,3]", "v2.0/3.0 [np,3,hn]", "grouped [ng,(np/ng+2),hn]"


def qkv_layout(spec: TpSpec) -> str:
    """Which row layout the spec's QKV tensor has (raises ValueError for an unknown checkpoint_version)."""
    if spec.qkv_version is None:
        return GROUPS
    version = float(spec.qkv_version)
    grouped = spec.num_groups is not None and spec.num_heads is not None and spec.num_groups < spec.num_heads
    if version == 0:
        return V0
    if 0 < version < 2.0:
        return V1
    if 2.0 <= version <= 3.0:
        return GROUPS if grouped else HEADS
    raise ValueError(f"unknown Megatron checkpoint_version {version:g} for a fused QKV tensor")


def check_qkv_split(spec: TpSpec, rows: int, tp: int) -> None:
    """Raise ValueError unless `rows` fused QKV rows split into `tp` ranks of whole heads (or query groups)."""
    layout = qkv_layout(spec)
    if tp == 1:
        return
    heads, groups = spec.num_heads, spec.num_groups
    if layout == GROUPS:
        units = groups or heads
        if units:
            if rows % units:
                raise ValueError(f"{rows} QKV rows do not hold {units} equal query groups")
            if units % tp:
                raise ValueError(f"{units} query groups do not divide by tp={tp}: a split would cut a group")
        elif rows % tp:
            raise ValueError(f"{rows} QKV rows do not divide by tp={tp}")
        return
    if rows % 3:
        raise ValueError(f"{rows} QKV rows are not three equal Q/K/V parts")
    if heads:
        if (rows // 3) % heads:
            raise ValueError(f"{rows} QKV rows do not hold {heads} equal heads")
        if heads % tp:
            raise ValueError(f"{heads} attention heads do not divide by tp={tp}: a split would cut a head")
    elif (rows // 3) % tp:
        raise ValueError(f"{rows // 3} rows per Q/K/V part do not divide by tp={tp}")


def merge_qkv(spec: TpSpec, slices: Sequence[torch.Tensor]) -> torch.Tensor:
    """The global fused QKV (weight or bias) from the TP ranks' slices, in rank order."""
    import torch

    if len(slices) == 1:
        return slices[0]
    if qkv_layout(spec) != V0:
        return torch.cat(list(slices), dim=0)
    parts = []
    for s in slices:
        if s.shape[0] % 3:
            raise ValueError(f"a v0 QKV slice of {s.shape[0]} rows is not three equal Q/K/V blocks")
        parts.append(torch.chunk(s, 3, dim=0))
    return torch.cat([torch.cat([p[k] for p in parts], dim=0) for k in range(3)], dim=0)


def split_qkv(spec: TpSpec, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """`tp` rank slices of a global fused QKV (the inverse of `merge_qkv`)."""
    import torch

    if tp == 1:
        return [full]
    check_qkv_split(spec, full.shape[0], tp)
    if qkv_layout(spec) != V0:
        return [c.contiguous() for c in torch.chunk(full, tp, dim=0)]
    pieces = [torch.chunk(block, tp, dim=0) for block in torch.chunk(full, 3, dim=0)]
    return [torch.cat([pc[r] for pc in pieces], dim=0).contiguous() for r in range(tp)]
