"""Plan a reshard of a Megatron-Core `torch_dist` checkpoint: the same global tensors, re-chunked for new ranks."""

from __future__ import annotations

import os
import re
from math import prod
from typing import Any

from .errors import CheckpointError, PlanError
from .formats.dcp import METADATA, ChunkBox, _storage_index
from .layout import Checkpoint, Param
from .plan import Plan, PlanItem, Target
from .plan_reshard import _degrees, _tracker_items
from .rules import TpRule
from .safe_unpickle import load_plain_pickle, load_torch_metadata
from .standins import StandIn
from .tensorref import ITEMSIZE
from .writers.torch_dist import DONE_DIR, DistChunk, DistSource, rank_file

_RANK_RE = re.compile(r"^__(\d+)_\d+\.distcp$")
_SHARD_RE = re.compile(r"/shard_(\d+)_(\d+)$")


def _intersects(a: ChunkBox, b: ChunkBox) -> int:
    """Elements in the intersection of two boxes (0 when they do not overlap)."""
    n = 1
    for ao, asz, bo, bsz in zip(a.offsets, a.sizes, b.offsets, b.sizes):
        n *= max(0, min(ao + asz, bo + bsz) - max(ao, bo))
    return n


def _src_rank(path: str) -> int | None:
    m = _RANK_RE.match(os.path.basename(path))
    return int(m.group(1)) if m else None


def _is_swiglu(intervals: list[tuple[int, int]], pairs: Any, dim: int, src_tp: int, size: int) -> bool:
    """Megatron's SwiGLU factory: 2·tp equal intervals on the TP dim, W of rank r at r and its V at r + tp."""
    n = 2 * src_tp
    if len(intervals) != n or any(s != size // n or o != i * (size // n) for i, (o, s) in enumerate(intervals)):
        return False
    index = {o: i for i, (o, _) in enumerate(intervals)}
    for box, ref in pairs:
        rank = _src_rank(ref.file)
        if rank is None or index[box.offsets[dim]] % src_tp != rank % src_tp:
            return False
    return True


def _stage_of(name: str, box: ChunkBox, param: Param, pp: int) -> int:
    """New pipeline stage that writes a chunk: stacked layers split evenly, embeddings first, the rest last."""
    if pp == 1:
        return 0
    if any(f.startswith("stacked") for f in param.flags) and param.shape:
        return min(pp - 1, box.offsets[0] * pp // param.shape[0])
    return 0 if name.startswith("embedding.") else pp - 1


def _tensor_chunks(ckpt: Checkpoint, param: Param, tp: int, src_tp: int) -> tuple[list[ChunkBox], list[int], str]:
    """The new chunk boxes of one tensor, each one's TP rank, and the rule label for the preview."""
    pairs = ckpt.meta["dcp_chunks"][param.name]
    boxes = list(dict.fromkeys(b for b, _ in pairs))
    if sum(b.numel for b in boxes) != param.numel:
        raise PlanError(f"{param.name}: saved chunks hold {sum(b.numel for b in boxes)} of {param.numel} elements")
    d = param.partition_dim
    if param.rule == TpRule.UNKNOWN.value:
        raise PlanError(f"{param.name}: saved chunks split more than one dim; no single TP dim to re-chunk")
    if d is None:
        return boxes, [-1] * len(boxes), "replicated"
    size = param.shape[d]
    intervals = sorted({(b.offsets[d], b.sizes[d]) for b in boxes})
    swiglu = _is_swiglu(intervals, pairs, d, src_tp, size)
    n = 2 * tp if swiglu else tp
    if size % n:
        raise PlanError(f"{param.name}: dim {d} of size {size} does not divide into {n} chunks for tp={tp}")
    step = size // n
    outer = sorted({tuple((o, s) for i, (o, s) in enumerate(zip(b.offsets, b.sizes)) if i != d) for b in boxes})
    if sum(prod(s for _, s in o) for o in outer) * size != param.numel:
        raise PlanError(f"{param.name}: saved chunks do not tile the dims other than the TP dim {d}")
    out: list[ChunkBox] = []
    ranks: list[int] = []
    for o in outer:
        for r in range(tp):
            for start in ((r * step, (r + tp) * step) if swiglu else (r * step,)):
                offs = [x for x, _ in o]
                sizes = [s for _, s in o]
                offs.insert(d, start)
                sizes.insert(d, step)
                out.append(ChunkBox(tuple(offs), tuple(sizes)))
                ranks.append(r)
    stacked = " of stacked layers" if any(f.startswith("stacked") for f in param.flags) else ""
    label = f"{param.rule} dim {d}{stacked}" + (" (SwiGLU: W at r, V at r+tp)" if swiglu else "")
    return out, ranks, label


def _bytes_entries(ckpt: Checkpoint) -> list[tuple[str, str, int, int]]:
    """Every BYTES entry of the source `.metadata`: (key, file, offset, length)."""
    meta_path = os.path.join(ckpt.path, METADATA)
    index = _storage_index(load_plain_pickle(meta_path).obj, meta_path)
    out = []
    for name in ckpt.meta.get("bytes_entries", ()):
        loc = index.get((name, None))
        if loc is None:
            raise PlanError(f"{meta_path}: bytes entry {name!r} has no storage entry")
        out.append((name, os.path.join(ckpt.path, loc[0]), loc[1], loc[2]))
    return out


def _has_args(path: str, offset: int = 0, length: int | None = None) -> bool:
    try:
        obj = load_torch_metadata(path, base_offset=offset, length=length).obj
    except CheckpointError:
        return False
    return isinstance(obj, dict) and isinstance(obj.get("args"), StandIn)


def plan_torch_dist(ckpt: Checkpoint, target: Target) -> Plan:
    """One `__R_0.distcp` item per new rank, `.metadata` assembled last from the offsets the rank items record."""
    tp, pp = _degrees(ckpt, target)
    if target.quantize:
        raise PlanError("int8 quantization is written for DeepSpeed layouts only, not torch_dist")
    opt = [p.name for p in ckpt.params if p.name.startswith("optimizer.")]
    if opt:
        raise PlanError(f"torch_dist optimizer state ({opt[0]}, …) cannot be resharded yet; save model weights only")
    src_tp = ckpt.degrees.tp
    world = tp * pp
    per_rank: dict[int, list[DistChunk]] = {r: [] for r in range(world)}
    shown: dict[int, list[dict[str, Any]]] = {r: [] for r in range(world)}
    loads = [0] * world
    order: list[tuple[Any, ...]] = []  # the `.metadata` entries in the source's order
    lengths = ckpt.meta.get("dcp_zip_lengths", {})
    for param in ckpt.params:
        boxes, ranks, label = _tensor_chunks(ckpt, param, tp, src_tp)
        order.append(("tensor", param.name, param.dtype, tuple(param.shape), tuple(boxes)))
        itemsize = ITEMSIZE.get(param.dtype, 4)
        pairs = ckpt.meta["dcp_chunks"][param.name]
        per_tensor: dict[int, list[ChunkBox]] = {}
        for box, t in zip(boxes, ranks):
            stage = _stage_of(param.name, box, param, pp)
            if t < 0:  # replicated: the least-loaded rank of the stage writes it
                t = min(range(tp), key=lambda r, s=stage: loads[s * tp + r])
            rank = stage * tp + t
            loads[rank] += box.numel * itemsize
            srcs = tuple(DistSource(b, ref, lengths.get((ref.file, ref.base_offset)))
                         for b, ref in pairs if _intersects(b, box))
            per_rank[rank].append(DistChunk(param.name, param.dtype, box, srcs))
            per_tensor.setdefault(rank, []).append(box)
        for rank, bs in per_tensor.items():
            shape = bs[0].sizes
            note = f"{label}; {len(bs)} chunks" if len(bs) > 1 else label
            shown[rank].append({"name": param.name, "label": note, "local": shape})
    bytes_by_rank: dict[int, list[dict[str, Any]]] = {r: [] for r in range(world)}
    for name, path, offset, length in _bytes_entries(ckpt):
        m = _SHARD_RE.search(name)
        stage = 0
        if m and pp > 1 and ".layers." in name and int(m.group(2)) > 0:
            stage = min(pp - 1, int(m.group(1)) * pp // int(m.group(2)))
        common = name.split("/")[0] == "common_state" and _has_args(path, offset, length)
        bytes_by_rank[stage * tp].append({"name": name, "src": path, "offset": offset, "length": length,
                                          "update_args": common})
        order.append(("bytes", name))
    tag = ckpt.tag
    items = []
    for r in range(world):
        chunks = per_rank[r]
        read = sum(_intersects(s.box, c.box) * ITEMSIZE.get(c.dtype, 4) for c in chunks for s in c.sources)
        write = loads[r] + 1200 * len(chunks) + sum(b["length"] for b in bytes_by_rank[r])
        peak = max((c.box.numel * ITEMSIZE.get(c.dtype, 4) for c in chunks), default=0) * 3
        items.append(PlanItem(
            id=f"dist_rank:{r}", kind="reshard_dist_rank", name=rank_file(r),
            rule=f"{len(chunks)} chunks, {len(bytes_by_rank[r])} byte entries",
            outputs=(f"{tag}/{rank_file(r)}", f"{DONE_DIR}/{tag}.rank{r}.json"),
            target_shapes=tuple(c.box.sizes for c in chunks[:1]), read_bytes=read, write_bytes=write,
            peak_bytes=peak, args={"rank": r, "tp": tp, "pp": pp, "chunks": chunks, "bytes": bytes_by_rank[r],
                                   "tensors": shown[r]}))
    common_pt = os.path.join(ckpt.path, "common.pt")
    if os.path.isfile(common_pt):
        size = os.path.getsize(common_pt)
        kind = "reshard_dist_common" if _has_args(common_pt) else "copy"
        items.append(PlanItem(id="dist_common", kind=kind, name="common.pt", rule="args updated"
                              if kind != "copy" else "copy", outputs=(f"{tag}/common.pt",), read_bytes=size,
                              write_bytes=size, peak_bytes=size * 2, args={"src": common_pt, "tp": tp, "pp": pp}))
    finalize = [PlanItem(id="dist_metadata", kind="reshard_dist_metadata", name=METADATA, rule="chunk index",
                         outputs=(f"{tag}/{METADATA}",), write_bytes=os.path.getsize(os.path.join(ckpt.path, METADATA)),
                         args={"order": order, "world": world, "tag": tag})]
    mj = os.path.join(ckpt.path, "metadata.json")
    if os.path.isfile(mj):
        finalize.append(PlanItem(id="dist_metadata_json", kind="copy", name="metadata.json",
                                 outputs=(f"{tag}/metadata.json",), read_bytes=os.path.getsize(mj),
                                 write_bytes=os.path.getsize(mj), args={"src": mj}))
    finalize += _tracker_items(ckpt, tag)
    warnings = list(ckpt.warnings)
    if any(b["name"].startswith("rng_state") for bs in bytes_by_rank.values() for b in bs):
        warnings.append("rng_state entries are per-rank objects and are copied unchanged (they cannot be resharded)")
    return Plan(source_path=ckpt.path, source_format=str(ckpt.format), target=target, items=tuple(items),
                layout_dirs=(tag, DONE_DIR), finalize=tuple(finalize), warnings=tuple(warnings),
                source_degrees=str(ckpt.degrees), target_degrees=f"tp={tp} pp={pp} dp={ckpt.degrees.dp}")
