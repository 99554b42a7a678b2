"""Plan a consolidated export (HF safetensors or torch .bin, any tp/pp/dp): one item per tensor, HF shard naming."""

from __future__ import annotations

import json

from .assemble import fragment_bytes
from .errors import PlanError
from .formats.base import spec_of
from .layout import Checkpoint, Param
from .plan import Plan, PlanItem, Target
from .tensorref import ITEMSIZE
from .writers.consolidated import SAFETENSORS_DTYPES, safetensors_header

ALIGN = 8


def _source(ckpt: Checkpoint, p: Param) -> tuple[Param, str]:
    """The parameter whose fragments hold the value (a tied alias reads its source) and the state to read."""
    src = p
    if p.tied_to is not None:
        src = ckpt.param(p.tied_to)
    state = "fp32" if "fp32" in src.states else "weight"
    if state not in src.states:
        raise PlanError(f"{p.name}: no fp32 master or model weights to read")
    return src, state


def _shard_names(n: int, kind: str) -> list[str]:
    if kind == "safetensors":
        return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    return ["pytorch_model.bin"] if n == 1 else [f"pytorch_model-{i + 1:05d}-of-{n:05d}.bin" for i in range(n)]


def plan_consolidated(ckpt: Checkpoint, target: Target) -> Plan:
    dtype = target.dtype or "float32"
    if dtype not in SAFETENSORS_DTYPES:
        raise PlanError(f"unsupported output dtype {dtype}")
    itemsize = ITEMSIZE[dtype]
    entries = []
    for p in ckpt.params:
        src, state = _source(ckpt, p)
        spec = spec_of(ckpt, src.name)
        flags = list(p.flags)
        if target.strict and flags:
            raise PlanError(f"{p.name}: {flags[0]} (--strict)")
        entries.append((p, src, state, spec, p.numel * itemsize, tuple(flags)))
    # greedy shards in checkpoint order
    shards: list[list[int]] = [[]]
    size = 0
    for i, (_, _, _, _, nbytes, _) in enumerate(entries):
        if shards[-1] and size + nbytes > target.max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += nbytes
    files = _shard_names(len(shards), target.kind)
    items: list[PlanItem] = []
    finalize: list[PlanItem] = []
    weight_map: dict[str, str] = {}
    total = sum(e[4] for e in entries)
    true_vocab = ckpt.meta.get("original_vocab_size")
    for fname, idxs in zip(files, shards):
        members = [entries[i] for i in idxs]
        for p, *_ in members:
            weight_map[p.name] = fname
        if target.kind == "safetensors":
            header, offsets = safetensors_header([(p.name, dtype, p.shape) for p, *_ in members])
            file_size = len(header) + sum(e[4] for e in members)
            items.append(PlanItem(id=f"header:{fname}", kind="safetensors_header", name=fname, outputs=(fname,),
                                  write_bytes=len(header), args={"header": header, "file_size": file_size}))
            for (p, src, state, spec, nbytes, flags) in members:
                items.append(PlanItem(
                    id=f"tensor:{p.name}", kind="tensor", name=p.name, rule=spec.label, spec=spec, param=src,
                    outputs=(fname,), target_shapes=(p.shape,), read_bytes=fragment_bytes(src, state),
                    write_bytes=nbytes, peak_bytes=3 * (src.padded_shape and _numel(src.padded_shape) or p.numel) * 4,
                    flags=flags, args={"state": state, "dtype": dtype, "offset": len(header) + offsets[p.name],
                                       "true_vocab": true_vocab, "shape": p.shape, "file": fname}))
        else:
            items.append(PlanItem(
                id=f"shard:{fname}", kind="torch_shard", name=fname, outputs=(fname,),
                target_shapes=tuple(p.shape for p, *_ in members),
                read_bytes=sum(fragment_bytes(src, state) for _, src, state, *_ in members),
                write_bytes=sum(e[4] for e in members), peak_bytes=sum(e[4] for e in members) + 3 * max(
                    (_numel(src.padded_shape or src.shape) * 4 for _, src, *_ in members), default=0),
                flags=tuple(f for m in members for f in m[5]),
                args={"members": tuple((p.name, src, state, spec) for p, src, state, spec, _, _ in members),
                      "dtype": dtype, "true_vocab": true_vocab}))
    if len(files) > 1:
        index_name = "model.safetensors.index.json" if target.kind == "safetensors" else "pytorch_model.bin.index.json"
        text = json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                          indent=2) + "\n"
        finalize.append(PlanItem(id="index", kind="write_file", name=index_name, outputs=(index_name,),
                                 write_bytes=len(text), args={"text": text}))
    warnings = list(ckpt.warnings)
    tied = [p.name for p in ckpt.params if p.tied_to]
    if tied:
        warnings.append(f"tied parameters written as copies of their source: {', '.join(tied)}")
    return Plan(source_path=ckpt.path, source_format=str(ckpt.format), target=target, items=tuple(items),
                finalize=tuple(finalize), warnings=tuple(warnings), source_degrees=str(ckpt.degrees),
                target_degrees=f"consolidated (tp=1 pp=1), {len(files)} file(s), {dtype}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
