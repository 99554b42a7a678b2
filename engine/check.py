"""Validate a checkpoint: missing/extra ranks, unreadable files, shard shapes, partition sums, replicated copies."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .assemble import assemble_local, local_shapes, source_stage
from .discover import iter_runs, read_checkpoint
from .errors import CheckpointError
from .layout import Checkpoint, Format
from .rules import TpRule
from .torchzip import TorchZip


@dataclass(frozen=True)
class Problem:
    """One finding: the file (or parameter) and what is wrong with it."""

    where: str
    problem: str

    def __str__(self) -> str:
        return f"{self.where}: {self.problem}"


def check_root(root: str, *, compare_replicas: bool = True) -> tuple[list[Problem], int]:
    """Check every iteration of every run under `root`; returns (problems, iterations checked)."""
    problems: list[Problem] = []
    count = 0
    for run in iter_runs(root):
        for ref in run.iterations:
            count += 1
            try:
                ckpt = read_checkpoint(ref)
            except CheckpointError as exc:
                problems.append(Problem(exc.path, exc.problem))
                continue
            problems.extend(check_checkpoint(ckpt, compare_replicas=compare_replicas))
    return problems, count


def check_checkpoint(ckpt: Checkpoint, *, compare_replicas: bool = True) -> list[Problem]:
    out: list[Problem] = []
    out += _check_files(ckpt)
    if ckpt.format == Format.DEEPSPEED:
        out += _check_rank_grid(ckpt)
    out += _check_shapes(ckpt)
    out += _check_partitions(ckpt)
    if compare_replicas and ckpt.degrees.tp > 1:
        out += _check_replicas(ckpt)
    for name in ckpt.meta.get("unknown_globals") or ():
        out.append(Problem(ckpt.path, f"a pickle names unknown global {name} (kept inert, never called)"))
    return out


def _check_files(ckpt: Checkpoint) -> list[Problem]:
    out = []
    for f in ckpt.files:
        if not f.path.endswith(".pt"):
            continue
        try:
            z = TorchZip(f.path)
            for rec in z.records.values():
                if rec.header_offset + rec.size > z.length:
                    out.append(Problem(f.path, f"record {rec.name} extends past the end of the file (truncated)"))
                    break
        except CheckpointError as exc:
            out.append(Problem(exc.path, exc.problem))
    return out


def _check_rank_grid(ckpt: Checkpoint) -> list[Problem]:
    d = ckpt.degrees
    out = []
    roles: dict[str, set[tuple]] = {}
    for f in ckpt.files:
        roles.setdefault(f.role, set()).add((f.pp, f.tp, f.dp))
    optim = roles.get("optim_states", set())
    if ckpt.zero_stage and ckpt.zero_stage > 0:
        want = {(p, t, r) for p in range(d.pp) for t in range(d.tp) for r in range(d.dp)}
        for p, t, r in sorted(want - optim):
            out.append(Problem(ckpt.path, f"missing optimizer file for dp rank {r}, tp rank {t}, pp stage {p}"))
        for p, t, r in sorted(optim - want):
            out.append(Problem(ckpt.path, f"extra optimizer file for dp rank {r}, tp rank {t}, pp stage {p} "
                                          f"(degrees are {d})"))
    models = roles.get("model_states", set())
    if ckpt.zero_stage == 3:
        want_m = {(p, t, r) for p in range(d.pp) for t in range(d.tp) for r in range(d.dp)}
    else:
        want_m = {(p, t, None) for p in range(d.pp) for t in range(d.tp)}
    for p, t, r in sorted(want_m - models, key=str):
        out.append(Problem(ckpt.path, f"missing model-states file for tp rank {t}, pp stage {p}"
                                      + (f", dp rank {r}" if r is not None else "")))
    layers: dict[int, set[int]] = {}
    for f in ckpt.files:
        if f.role == "layer" and f.layer is not None:
            layers.setdefault(f.layer, set()).add(f.tp or 0)
    for layer, tps in sorted(layers.items()):
        if len(tps) != d.tp and max(len(v) for v in layers.values()) == d.tp:
            out.append(Problem(ckpt.path, f"layer {layer} has files for tp ranks {sorted(tps)}, expected {d.tp}"))
    return out


def _check_shapes(ckpt: Checkpoint) -> list[Problem]:
    out = []
    for p in ckpt.params:
        if p.tied_to is not None:
            continue
        by_stage: dict[int, list[tuple[int, ...]]] = {}
        for s in p.shards:
            by_stage.setdefault(s.pp, []).append(s.shape)
        for stage, shapes in by_stage.items():
            if len(set(shapes)) > 1:
                out.append(Problem(p.name, f"shard shapes disagree across tp ranks on stage {stage}: "
                                           f"{sorted(set(shapes))}"))
            if ckpt.degrees.tp > 1 and len(shapes) not in (1, ckpt.degrees.tp):
                out.append(Problem(p.name, f"{len(shapes)} tensor-parallel shards, expected {ckpt.degrees.tp}"))
    return out


def _check_partitions(ckpt: Checkpoint) -> list[Problem]:
    out = []
    for p in ckpt.params:
        if p.tied_to is not None:
            continue
        stage = source_stage(p)
        shapes = local_shapes(p)
        for state in p.states:
            if state == "step":
                continue
            for tp, shape in enumerate(shapes):
                frags = [f for f in p.fragments if f.state == state and f.tp == tp and f.pp == stage]
                if not frags:
                    continue
                need = 1
                for s in shape:
                    need *= s
                spans = sorted((f.dst_start, f.dst_start + f.numel) for f in frags)
                have = sum(b - a for a, b in spans)
                gaps = any(spans[i][1] != spans[i + 1][0] for i in range(len(spans) - 1))
                if have != need or spans[0][0] != 0 or gaps:
                    out.append(Problem(p.name, f"{state} partitions hold {have} of {need} elements on tp rank {tp}"
                                               + (" (gaps or overlaps)" if gaps else "")))
                for f in frags:
                    if f.src_start + f.numel > f.tensor.numel:
                        out.append(Problem(f.tensor.file, f"{p.name}: {state} fragment reaches past its partition"))
    return out


def _check_replicas(ckpt: Checkpoint) -> list[Problem]:
    """TP-replicated parameters must be identical on every TP rank (reads those small tensors)."""
    import torch

    out = []
    for p in ckpt.params:
        if p.rule != TpRule.REPLICATED.value or p.tied_to is not None:
            continue
        state = "fp32" if "fp32" in p.states else ("weight" if "weight" in p.states else None)
        if state is None:
            continue
        shapes = local_shapes(p)
        if len(shapes) < 2:
            continue
        try:
            first = assemble_local(p, state, 0, shapes[0])
            for tp in range(1, len(shapes)):
                other = assemble_local(p, state, tp, shapes[tp])
                if not torch.equal(first, other):
                    diff = (first.float() - other.float()).abs().max().item()
                    files = sorted({os.path.basename(f.tensor.file) for f in p.fragments if f.state == state})
                    out.append(Problem(p.name, f"tensor-parallel replicas differ between tp rank 0 and tp rank {tp} "
                                               f"(max |diff| {diff:.3g}; {', '.join(files)})"))
                    break
        except CheckpointError as exc:
            out.append(Problem(exc.path, exc.problem))
    return out
