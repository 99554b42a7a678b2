"""Plan a model-weights reshard of a Megatron-DeepSpeed pipeline checkpoint to new tensor/pipeline degrees."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import replace
from math import prod
from typing import Any

from .errors import PlanError
from .formats.deepspeed import param_spec
from .layout import Checkpoint, Format, Param
from .plan import Plan, PlanItem, Target
from .rules import TpRule, TpSpec, local_shape, padded_vocab_size
from .safe_unpickle import load_torch_metadata
from .tensorref import ITEMSIZE, TensorRef


def layer_file(layer: int, tp: int) -> str:
    return f"layer_{layer:02d}-model_{tp:02d}-model_states.pt"


def _layer_param_name(ckpt_names: set[str], layer: int, key: str) -> str | None:
    name = f"{layer}.{key}"
    if name in ckpt_names:
        return name
    tied = [n for n in ckpt_names if n.startswith("tied_modules.") and n.endswith("." + key)]
    return tied[0] if len(tied) == 1 else None


def stage_of_layers(layer_keys: dict[int, tuple[str, ...]], pp: int) -> dict[int, int]:
    """New pipeline stage of each layer file: transformer layers (the most common key set) split evenly,
    the first stages taking one more when they do not divide (DeepSpeed's uniform partition); layers before
    the first transformer layer go to stage 0, layers after the last to the last stage."""
    layers = sorted(layer_keys)
    common = Counter(layer_keys[lyr] for lyr in layers).most_common(1)[0][0]
    blocks = [lyr for lyr in layers if layer_keys[lyr] == common]
    if len(blocks) < pp:
        raise PlanError(f"{len(blocks)} transformer layers cannot fill {pp} pipeline stages")
    base, extra = divmod(len(blocks), pp)
    out: dict[int, int] = {}
    i = 0
    for stage in range(pp):
        for _ in range(base + (1 if stage < extra else 0)):
            out[blocks[i]] = stage
            i += 1
    for lyr in layers:
        if lyr not in out:
            out[lyr] = 0 if lyr < blocks[0] else pp - 1
    return out


def _vocab_rows(ckpt: Checkpoint, spec: TpSpec, padded_rows: int, tp: int) -> int:
    """The padded vocabulary rows the target needs (Megatron's padding for the new tp)."""
    args = ckpt.meta.get("args")
    true_vocab = ckpt.meta.get("original_vocab_size")
    divisible = getattr(args, "make_vocab_size_divisible_by", None) if args is not None else None
    if not spec.vocab or not isinstance(true_vocab, int) or not divisible:
        return padded_rows
    return padded_vocab_size(true_vocab, int(divisible), tp)


def plan_reshard(ckpt: Checkpoint, target: Target) -> Plan:
    if ckpt.format != Format.DEEPSPEED:
        raise PlanError(f"reshard reads DeepSpeed pipeline checkpoints; {ckpt.format} is not supported yet")
    if ckpt.zero_stage == 3:
        raise PlanError("ZeRO-3 checkpoints have no per-layer model files to reshard; convert to universal instead")
    layer_files = [f for f in ckpt.files if f.role == "layer"]
    if not layer_files:
        raise PlanError("no pipeline layer files (layer_XX-model_TT-model_states.pt): only Megatron-DeepSpeed "
                        "pipeline checkpoints can be resharded")
    if target.quantize:
        raise PlanError(f"{target.quantize} quantization for this layout is not implemented yet")
    tp_new = int(target.tp or ckpt.degrees.tp)
    pp_new = int(target.pp or ckpt.degrees.pp)
    if tp_new < 1 or pp_new < 1:
        raise PlanError(f"bad target degrees tp={tp_new} pp={pp_new}")
    src_tp = ckpt.degrees.tp
    by_layer: dict[int, dict[int, str]] = {}
    for f in layer_files:
        by_layer.setdefault(int(f.layer or 0), {})[int(f.tp or 0)] = f.path
    for layer, files in by_layer.items():
        if sorted(files) != list(range(src_tp)):
            raise PlanError(f"layer {layer}: files for tp ranks {sorted(files)} of {src_tp}")
    params = {p.name: p for p in ckpt.params}
    names = set(params)
    layer_keys: dict[int, tuple[str, ...]] = {}
    layer_entries: dict[int, list[dict[str, Any]]] = {}
    items: list[PlanItem] = []
    for layer in sorted(by_layer):
        obj = load_torch_metadata(by_layer[layer][0]).obj
        if not isinstance(obj, dict):
            raise PlanError(f"{by_layer[layer][0]}: a layer file that is not a dict")
        keys = tuple(k for k, v in obj.items() if isinstance(v, TensorRef))
        layer_keys[layer] = keys
        entries = []
        for key in keys:
            name = _layer_param_name(names, layer, key)
            flags: list[str] = []
            if name is None:
                raise PlanError(f"layer {layer}: tensor {key!r} is not a parameter the reader found")
            p: Param = params[name]
            spec = param_spec(ckpt, name)
            if spec.rule == TpRule.UNKNOWN:
                flags.append("no partition rule matched: split on dim 0 (DeepSpeed's default); --strict refuses")
                if target.strict:
                    raise PlanError(f"{name}: {flags[0]} (--strict)")
            padded = tuple(p.padded_shape or p.shape)
            rows = _vocab_rows(ckpt, spec, padded[0], tp_new) if padded else 0
            full = (rows, *padded[1:]) if spec.vocab and padded else padded
            try:
                new_local = local_shape(spec, full, tp_new)
            except ValueError as exc:
                raise PlanError(f"{name}: {exc}") from None
            entries.append({"key": key, "name": name, "param": p, "spec": replace(spec, vocab=False),
                            "label": spec.label, "rows": rows if spec.vocab else None, "local": new_local,
                            "flags": tuple(flags), "itemsize": ITEMSIZE.get(p.dtype, 4)})
        layer_entries[layer] = entries
    stages = stage_of_layers(layer_keys, pp_new)
    tag = ckpt.tag
    for layer in sorted(by_layer):
        entries = layer_entries[layer]
        read = sum(prod(f.tensor.shape) * f.tensor.itemsize for e in entries for f in e["param"].fragments
                   if f.state == "weight")
        write = sum(prod(e["local"]) * e["itemsize"] for e in entries) + 1024 + 200 * len(entries)
        largest = max(entries, key=lambda e: prod(e["local"]), default=None)
        peak = sum(prod(e["param"].padded_shape or e["param"].shape) * e["itemsize"] for e in entries) * 2
        for t in range(tp_new):
            fname = layer_file(layer, t)
            items.append(PlanItem(
                id=f"layer:{layer}:{t}", kind="reshard_layer", name=fname,
                rule=largest["label"] if largest else "", spec=largest["spec"] if largest else None,
                outputs=(f"{tag}/{fname}",), target_shapes=(largest["local"],) if largest else (),
                read_bytes=read, write_bytes=write, peak_bytes=peak,
                flags=tuple(f for e in entries for f in e["flags"]),
                args={"tp": tp_new, "rank": t, "layer": layer, "stage": stages[layer],
                      "tensors": [{k: e[k] for k in ("key", "name", "param", "spec", "rows", "local", "label")}
                                  for e in entries]},
            ))
    items += _mp_rank_items(ckpt, tag, tp_new, pp_new, stages, layer_entries)
    finalize = _tracker_items(ckpt, tag)
    warnings = list(ckpt.warnings)
    warnings.append("model weights only: the optimizer state is not resharded (no ZeRO optimizer files are "
                    "written; the old ones would be stale); convert to universal to reshard optimizer state")
    return Plan(source_path=ckpt.path, source_format=str(ckpt.format), target=target, items=tuple(items),
                layout_dirs=(tag,), finalize=tuple(finalize), warnings=tuple(warnings),
                source_degrees=str(ckpt.degrees), target_degrees=f"tp={tp_new} pp={pp_new} dp={ckpt.degrees.dp}")


def _mp_rank_items(ckpt: Checkpoint, tag: str, tp_new: int, pp_new: int, stages: dict[int, int],
                   layer_entries: dict[int, list[dict[str, Any]]]) -> list[PlanItem]:
    model_files = list(ckpt.meta.get("model_files") or ())
    if not model_files:
        raise PlanError("no mp_rank_*_model_states.pt files")
    src = load_torch_metadata(model_files[0]).obj
    groups_src = src.get("param_shapes") or []
    last = load_torch_metadata(model_files[-1]).obj.get("param_shapes") or []
    last_names = {n for g in last if isinstance(g, dict) for n in g}
    # every name's group and global order, over all source stages (tp rank 0 of each)
    order: list[list[str]] = []
    for path in model_files[:: max(ckpt.degrees.tp, 1)]:
        gs = load_torch_metadata(path).obj.get("param_shapes") or []
        for gi, g in enumerate(gs):
            while len(order) <= gi:
                order.append([])
            order[gi] += [n for n in (g or {}) if n not in order[gi]]
    name_stages: dict[str, set[int]] = {}
    local_of: dict[str, tuple[int, ...]] = {}
    for layer, entries in layer_entries.items():
        for e in entries:
            st = {stages[layer]}
            if e["name"].startswith("tied_modules.") and e["name"] in last_names:
                st.add(pp_new - 1)  # the tied copy the last stage holds (the LM head)
            name_stages.setdefault(e["name"], set()).update(st)
            local_of[e["name"]] = e["local"]
    vocab_rows = next((e["rows"] for es in layer_entries.values() for e in es if e["rows"]), None)
    items = []
    size = os.path.getsize(model_files[0])
    for p in range(pp_new):
        shapes = [[(n, local_of[n]) for n in names if n in local_of and p in name_stages.get(n, ())]
                  for names in order]
        if not order and not groups_src:
            shapes = []
        for t in range(tp_new):
            mp = p * tp_new + t
            fname = f"mp_rank_{mp:02d}_model_states.pt"
            items.append(PlanItem(
                id=f"mp_rank:{mp}", kind="reshard_mp_rank", name=fname, rule="metadata",
                outputs=(f"{tag}/{fname}",), target_shapes=(), read_bytes=size, write_bytes=size,
                peak_bytes=size * 2,
                args={"src": model_files[0], "tp": tp_new, "pp": pp_new, "param_shapes": shapes,
                      "padded_vocab_size": vocab_rows},
            ))
    return items


def _tracker_items(ckpt: Checkpoint, tag: str) -> list[PlanItem]:
    out = []
    root = ckpt.run_root if os.path.isdir(ckpt.run_root) else os.path.dirname(ckpt.path)
    if os.path.normpath(root) == os.path.normpath(ckpt.path):
        root = os.path.dirname(ckpt.path)
    for fname in ("latest", "latest_checkpointed_iteration.txt"):
        path = os.path.join(root, fname)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
            if fname == "latest" and text.strip() != tag:
                text = tag  # the source's latest names another iteration: point at the one written
            elif fname != "latest" and text.strip() != str(ckpt.iteration) and ckpt.iteration is not None:
                text = str(ckpt.iteration)
            out.append(PlanItem(id=f"tracker:{fname}", kind="write_file", name=fname, outputs=(fname,),
                                write_bytes=len(text), args={"text": text}))
    return out
