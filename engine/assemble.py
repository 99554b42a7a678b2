"""Assemble one parameter state from its fragments (mmap reads of exactly those bytes), then merge TP ranks."""

from __future__ import annotations

from math import prod
from typing import TYPE_CHECKING

from .errors import CheckpointError
from .layout import Fragment, Param
from .rules import TpRule, TpSpec, merge, strip_vocab
from .tensor_io import read_flat, torch_dtype

if TYPE_CHECKING:
    import torch


def source_stage(param: Param) -> int:
    """The pipeline stage whose copy is authoritative (stage 0's copy of tied, replicated embeddings)."""
    return min((s.pp for s in param.shards), default=0)


def local_shapes(param: Param) -> list[tuple[int, ...]]:
    stage = source_stage(param)
    shards = sorted((s for s in param.shards if s.pp == stage), key=lambda s: s.tp)
    return [s.shape for s in shards]


def fragment_bytes(param: Param, state: str) -> int:
    return sum(f.numel * f.tensor.itemsize for f in param.fragments if f.state == state)


def assemble_local(param: Param, state: str, tp: int, shape: tuple[int, ...],
                   frags: list[Fragment] | None = None) -> torch.Tensor:
    """TP rank `tp`'s local tensor of `state`, gathered from its data-parallel fragments."""
    import torch

    stage = source_stage(param)
    if frags is None:
        frags = [f for f in param.fragments if f.state == state and f.tp == tp and f.pp == stage]
    numel = prod(shape)
    if not frags:
        raise CheckpointError(param.name, f"no {state} fragments for tensor-parallel rank {tp}")
    if len(frags) == 1 and frags[0].dst_start == 0 and frags[0].numel == numel:  # ZeRO-1/2's usual case
        f = frags[0]
        return read_flat(f.tensor, f.src_start, f.numel, copy=False).view(shape)
    dtype = torch_dtype(frags[0].tensor.dtype)
    out = torch.empty(numel, dtype=dtype)
    covered = 0
    for f in sorted(frags, key=lambda f: f.dst_start):
        if f.dst_start != covered and f.dst_start < covered:
            raise CheckpointError(f.tensor.file, f"{param.name}: {state} fragments overlap at element {f.dst_start}")
        if f.dst_start + f.numel > numel:
            raise CheckpointError(f.tensor.file, f"{param.name}: {state} fragment ends past {numel} elements")
        out[f.dst_start : f.dst_start + f.numel] = read_flat(f.tensor, f.src_start, f.numel, copy=False)
        covered = max(covered, f.dst_start + f.numel)
    got = sum(f.numel for f in frags)
    if got != numel:
        raise CheckpointError(frags[0].tensor.file,
                              f"{param.name}: {state} fragments hold {got} of {numel} elements (tp rank {tp})")
    return out.view(shape)


def assemble_state(param: Param, spec: TpSpec, state: str, *, true_vocab: int | None = None,
                   check_replicated: bool = True) -> torch.Tensor:
    """The global tensor of `state`: every TP rank assembled, merged by the rule, vocabulary padding stripped."""
    shapes = local_shapes(param)
    slices = [assemble_local(param, state, tp, shape) for tp, shape in enumerate(shapes)]
    try:
        full = merge(spec, slices, check_replicated=check_replicated)
    except ValueError as exc:
        raise CheckpointError(param.name, str(exc)) from None
    if spec.vocab:
        full = strip_vocab(full, true_vocab)
    return full


def read_step(param: Param) -> torch.Tensor | None:
    """The optimizer step of the parameter's group (first TP rank, first DP rank), or None."""
    for f in param.fragments:
        if f.state == "step":
            return read_flat(f.tensor, 0, 1).view(()) if f.tensor.shape == () else read_flat(f.tensor, 0, 1)
    return None


def copy_runs(param: Param, spec: TpSpec, state: str, *, true_vocab: int | None = None
              ) -> list[tuple[Fragment, int, int, int]] | None:
    """The global tensor of `state` as byte-for-byte copies of fragments: (fragment, first element inside it,
    element count, destination element). None when the merge is not a plain concatenation along dim 0 (row
    splits, SwiGLU halves, v0 QKV, averaged or replicated copies to compare): then `assemble_state` is the way."""
    shapes = local_shapes(param)
    if len(shapes) > 1 and not (
        spec.dim == 0 and (spec.rule in (TpRule.COLUMN, TpRule.UNKNOWN)
                           or (spec.rule == TpRule.QKV and spec.qkv_version not in (None, 0, 0.0)))
    ):
        return None
    stage = source_stage(param)
    total = sum(prod(s) for s in shapes)
    if spec.vocab and true_vocab is not None and shapes and shapes[0] and len(shapes) * shapes[0][0] > true_vocab:
        total = true_vocab * prod(shapes[0][1:])
    runs: list[tuple[Fragment, int, int, int]] = []
    base = 0
    for tp, shape in enumerate(shapes):
        for f in param.fragments:
            if f.state != state or f.tp != tp or f.pp != stage or not f.tensor.is_contiguous:
                if f.state == state and f.tp == tp and f.pp == stage:
                    return None
                continue
            dst = base + f.dst_start
            n = min(f.numel, total - dst)
            if n > 0:
                runs.append((f, f.src_start, n, dst))
        base += prod(shape)
    if sum(n for _, _, n, _ in runs) != total:
        return None
    return sorted(runs, key=lambda r: r[3])


def merged_shape(param: Param, spec: TpSpec, *, true_vocab: int | None = None) -> tuple[int, ...]:
    """The shape of the tensor `copy_runs` describes: TP slices stacked on dim 0, vocabulary padding stripped."""
    shapes = local_shapes(param)
    shape = list(shapes[0])
    if len(shapes) > 1 and shape:
        shape[0] = sum(s[0] for s in shapes)
    if spec.vocab and true_vocab is not None and shape and shape[0] > true_vocab:
        shape[0] = true_vocab
    return tuple(shape)
