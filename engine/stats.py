"""Parameter statistics (min/max/mean/std/norm, NaN/Inf counts) streamed over one copy of each element."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .layout import Param
from .tensor_io import read_flat


@dataclass(frozen=True)
class ParamStats:
    """Summary statistics of one parameter's values (one copy of each element)."""

    state: str  # the optimizer state read: "fp32" (master weights) or "weight" (the model-dtype copy)
    numel: int
    min: float
    max: float
    mean: float
    std: float  # population standard deviation
    norm: float  # L2 norm
    nan: int
    inf: int


def stats_state(param: Param) -> str | None:
    """The state statistics read: fp32 master weights when saved, else the model-dtype weights."""
    states = param.states
    for state in ("fp32", "weight"):
        if state in states:
            return state
    return None


def _unpadded_limits(param: Param) -> dict[int, int]:
    """Per TP rank, how many leading local elements are real (not vocabulary padding); empty when unpadded."""
    padded = param.padded_shape
    if not padded or param.partition_dim != 0 or tuple(padded) == tuple(param.shape):
        return {}
    tp = max((s.tp for s in param.shards), default=0) + 1
    rows = padded[0] // tp
    row_numel = math.prod(padded[1:])
    return {rank: max(0, min(rows, param.shape[0] - rank * rows)) * row_numel for rank in range(tp)}


def param_stats(param: Param) -> ParamStats:
    """Stream over one copy of every element (first pipeline stage; one TP rank when replicated)."""
    import torch

    state = stats_state(param)
    if state is None:
        raise ValueError(f"{param.name}: no fp32 or weight values in this checkpoint")
    frags = [f for f in param.fragments_of(state) if f.numel > 0 and f.tensor.shape != ()]
    if frags:
        first_pp = min(f.pp for f in frags)
        frags = [f for f in frags if f.pp == first_pp]
        if param.partition_dim is None:
            first_tp = min(f.tp for f in frags)
            frags = [f for f in frags if f.tp == first_tp]
    limits = _unpadded_limits(param)
    count = nan = inf = 0
    total = total_sq = 0.0
    lo, hi = math.inf, -math.inf
    for frag in frags:
        numel = frag.numel
        limit = limits.get(frag.tp)
        if limit is not None:  # drop vocabulary padding at the end of this rank's rows
            numel = max(0, min(numel, limit - frag.dst_start))
        if numel == 0:
            continue
        values = read_flat(frag.tensor, frag.src_start, numel, copy=False).to(torch.float64)
        finite_mask = torch.isfinite(values)
        nan += int(torch.isnan(values).sum())
        inf += int(torch.isinf(values).sum())
        finite = values[finite_mask]
        if finite.numel():
            count += finite.numel()
            total += float(finite.sum())
            total_sq += float((finite * finite).sum())
            lo = min(lo, float(finite.min()))
            hi = max(hi, float(finite.max()))
    if count == 0:
        return ParamStats(state, nan + inf, math.nan, math.nan, math.nan, math.nan, math.nan, nan, inf)
    mean = total / count
    var = max(0.0, total_sq / count - mean * mean)
    return ParamStats(state, count + nan + inf, lo, hi, mean, math.sqrt(var), math.sqrt(total_sq), nan, inf)
