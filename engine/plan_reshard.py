"""Plan a model-weights reshard of a (Megatron-)DeepSpeed or Megatron-LM checkpoint to new tensor/pipeline degrees."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import replace
from math import prod
from typing import Any

from .errors import PlanError
from .formats.deepspeed import param_spec
from .layout import Checkpoint, Format, Param
from .plan import Plan, PlanItem, Target
from .quantize import merge_count_for, scale_slot
from .rules import TpRule, TpSpec, global_shape, local_shape, padded_vocab_size
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


OPTIMIZER_WARNING = ("model weights only: the optimizer state is not resharded (no ZeRO optimizer files are "
                     "written; the old ones would be stale); convert to universal to reshard optimizer state")


def quant_args(target: Target, src_tp: int, tp_new: int) -> dict[str, Any] | None:
    """What the writers need to quantize a target rank (None without --quantize)."""
    if not target.quantize:
        return None
    if target.quantize != "int8":
        raise PlanError(f"unknown quantization {target.quantize!r} (int8 only)")
    return {"bits": 8, "groups": int(target.groups), "mlp_extra_grouping": bool(target.mlp_extra_grouping),
            "mp_size": tp_new, "merge_count": merge_count_for(src_tp, tp_new)}


def _degrees(ckpt: Checkpoint, target: Target) -> tuple[int, int]:
    tp_new = int(target.tp or ckpt.degrees.tp)
    pp_new = int(target.pp or ckpt.degrees.pp)
    if tp_new < 1 or pp_new < 1:
        raise PlanError(f"bad target degrees tp={tp_new} pp={pp_new}")
    return tp_new, pp_new


def plan_reshard(ckpt: Checkpoint, target: Target) -> Plan:
    if ckpt.format == Format.TORCH_DIST:
        from .plan_reshard_torch_dist import plan_torch_dist

        return plan_torch_dist(ckpt, target)
    if ckpt.format == Format.MEGATRON:
        return plan_megatron(ckpt, target)
    if ckpt.format != Format.DEEPSPEED:
        raise PlanError(f"reshard reads DeepSpeed and Megatron-LM checkpoints; {ckpt.format} is not supported yet")
    if ckpt.zero_stage == 3:
        raise PlanError("ZeRO-3 checkpoints have no per-layer model files to reshard; convert to universal instead")
    layer_files = [f for f in ckpt.files if f.role == "layer"]
    if not layer_files:
        return plan_module(ckpt, target)
    tp_new, pp_new = _degrees(ckpt, target)
    src_tp = ckpt.degrees.tp
    quant = quant_args(target, src_tp, tp_new)
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
        quantized = quant is not None and any(scale_slot(e["name"]) for e in entries)
        for t in range(tp_new):
            fname = layer_file(layer, t)
            items.append(PlanItem(
                id=f"layer:{layer}:{t}", kind="reshard_layer", name=fname,
                rule=(largest["label"] if largest else "") + (" → int8" if quantized else ""),
                spec=largest["spec"] if largest else None,
                outputs=(f"{tag}/{fname}",), target_shapes=(largest["local"],) if largest else (),
                read_bytes=read, write_bytes=write, peak_bytes=peak,
                flags=tuple(f for e in entries for f in e["flags"]),
                args={"tp": tp_new, "rank": t, "layer": layer, "stage": stages[layer], "quant": quant,
                      "tensors": [{k: e[k] for k in ("key", "name", "param", "spec", "rows", "local", "label")}
                                  for e in entries]},
            ))
    items += _mp_rank_items(ckpt, tag, tp_new, pp_new, stages, layer_entries, quant)
    finalize = _tracker_items(ckpt, tag)
    warnings = list(ckpt.warnings)
    warnings.append(OPTIMIZER_WARNING)
    return Plan(source_path=ckpt.path, source_format=str(ckpt.format), target=target, items=tuple(items),
                layout_dirs=(tag,), finalize=tuple(finalize), warnings=tuple(warnings),
                source_degrees=str(ckpt.degrees), target_degrees=f"tp={tp_new} pp={pp_new} dp={ckpt.degrees.dp}")


def _mp_rank_items(ckpt: Checkpoint, tag: str, tp_new: int, pp_new: int, stages: dict[int, int],
                   layer_entries: dict[int, list[dict[str, Any]]], quant: dict[str, Any] | None) -> list[PlanItem]:
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
        # the stage's quantized weights (their int8 goes to the layer files, their scales to this file)
        qt = [{k: e[k] for k in ("key", "name", "param", "spec", "rows", "local")}
              for layer in sorted(layer_entries) if stages[layer] == p
              for e in layer_entries[layer] if scale_slot(e["name"])] if quant else []
        qread = sum(prod(f.tensor.shape) * f.tensor.itemsize for e in qt for f in e["param"].fragments
                    if f.state == "weight")
        for t in range(tp_new):
            mp = p * tp_new + t
            fname = f"mp_rank_{mp:02d}_model_states.pt"
            items.append(PlanItem(
                id=f"mp_rank:{mp}", kind="reshard_mp_rank", name=fname,
                rule="metadata" + (f" + int8 scales of {len(qt)} weights" if qt else ""),
                outputs=(f"{tag}/{fname}",), target_shapes=(), read_bytes=size + qread, write_bytes=size,
                peak_bytes=size * 2 + qread * 2,
                args={"src": model_files[0], "tp": tp_new, "pp": pp_new, "param_shapes": shapes,
                      "padded_vocab_size": vocab_rows, "rank": t, "quant": quant, "quant_tensors": qt},
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


# -- non-pipeline DeepSpeed / Megatron-DeepSpeed (`module` inside mp_rank_XX_model_states.pt) --------------------
def flat_module(module: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves of a (possibly nested, Megatron-style) module state dict by dotted name, in order."""
    out: dict[str, Any] = {}
    for k, v in module.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_module(v, name + "."))
        else:
            out[name] = v
    return out


def _module_spec(ckpt: Checkpoint, name: str, buffer: bool, strict: bool) -> tuple[TpSpec, list[str]]:
    if buffer:
        return TpSpec(TpRule.REPLICATED, pattern="buffer"), []
    spec = param_spec(ckpt, name)
    flags = []
    if spec.rule == TpRule.UNKNOWN:
        flags.append("no partition rule matched: split on dim 0 (DeepSpeed's default); --strict refuses")
        if strict:
            raise PlanError(f"{name}: {flags[0]} (--strict)")
    return spec, flags


def plan_module(ckpt: Checkpoint, target: Target) -> Plan:
    """Non-pipeline checkpoints: one mp_rank file per new TP rank, its `module` that rank's split."""
    tp_new, pp_new = _degrees(ckpt, target)
    if ckpt.degrees.pp != 1 or pp_new != 1:
        raise PlanError(f"a non-pipeline checkpoint (no layer files) reshards to pp=1 only, not pp={pp_new}")
    src_tp = ckpt.degrees.tp
    quant = quant_args(target, src_tp, tp_new)
    model_files = list(ckpt.meta.get("model_files") or ())
    if len(model_files) != src_tp:
        raise PlanError(f"{len(model_files)} mp_rank_*_model_states.pt files for tp={src_tp}")
    objs = [load_torch_metadata(p).obj for p in model_files]
    flats = []
    for path, obj in zip(model_files, objs):
        if not isinstance(obj, dict) or not isinstance(obj.get("module"), dict):
            raise PlanError(f"{path}: no `module` state dict to reshard")
        flats.append(flat_module(obj["module"]))
    buffers = set(objs[0].get("buffer_names") or ())
    tensors: list[dict[str, Any]] = []
    vocab_rows = None
    for name, ref in flats[0].items():
        if not isinstance(ref, TensorRef):
            continue  # non-tensor leaves are copied from the source's rank 0 file
        refs = [f.get(name) for f in flats]
        missing = [r for r, x in enumerate(refs) if not isinstance(x, TensorRef)]
        if missing:
            raise PlanError(f"{name}: missing from the module of tp rank {missing[0]}")
        spec, flags = _module_spec(ckpt, name, name in buffers, target.strict)
        try:
            full = global_shape(spec, [r.shape for r in refs])
            rows = _vocab_rows(ckpt, spec, full[0], tp_new) if spec.vocab and full else None
            if rows is not None:
                full = (rows, *full[1:])
                vocab_rows = rows
            new_local = local_shape(spec, full, tp_new)
        except ValueError as exc:
            raise PlanError(f"{name}: {exc}") from None
        quantized = quant is not None and scale_slot(name) is not None
        tensors.append({"name": name, "refs": refs, "spec": replace(spec, vocab=False), "rows": rows,
                        "local": new_local, "label": spec.label + (" → int8" if quantized else ""),
                        "flags": tuple(flags), "itemsize": ref.itemsize, "buffer": name in buffers})
    if not tensors:
        raise PlanError(f"{model_files[0]}: the module holds no tensors")
    read = sum(prod(r.shape) * r.itemsize for e in tensors for r in e["refs"])
    write = sum(prod(e["local"]) * (1 if "int8" in e["label"] else e["itemsize"]) for e in tensors)
    meta_size = max(0, os.path.getsize(model_files[0]) - sum(prod(r.shape) * r.itemsize for r in flats[0].values()
                                                             if isinstance(r, TensorRef)))
    largest = max(tensors, key=lambda e: prod(e["local"]))
    peak = max(prod(e["local"]) * e["itemsize"] * tp_new for e in tensors) * 3 + write
    labels = list(dict.fromkeys(e["label"] for e in tensors))
    items = []
    for t in range(tp_new):
        fname = f"mp_rank_{t:02d}_model_states.pt"
        items.append(PlanItem(
            id=f"module:{t}", kind="reshard_module", name=fname, rule=", ".join(labels), spec=largest["spec"],
            outputs=(f"{ckpt.tag}/{fname}",), target_shapes=(largest["local"],),
            read_bytes=read, write_bytes=write + meta_size, peak_bytes=peak,
            flags=tuple(f"{e['name']}: {f}" for e in tensors for f in e["flags"]),
            args={"src": model_files[0], "tp": tp_new, "rank": t, "quant": quant, "padded_vocab_size": vocab_rows,
                  "tensors": [{k: e[k] for k in ("name", "refs", "spec", "rows", "local", "label", "buffer")}
                              for e in tensors]},
        ))
    warnings = [*ckpt.warnings, OPTIMIZER_WARNING]
    return Plan(source_path=ckpt.path, source_format=str(ckpt.format), target=target, items=tuple(items),
                layout_dirs=(ckpt.tag,), finalize=tuple(_tracker_items(ckpt, ckpt.tag)), warnings=tuple(warnings),
                source_degrees=str(ckpt.degrees), target_degrees=f"tp={tp_new} pp=1 dp={ckpt.degrees.dp}")


# -- Megatron-LM legacy (`iter_N/mp_rank_TT[_PPP]/model_optim_rng.pt`) -------------------------------------------
_LAYER = re.compile(r"(?:^|(?<=\.))layers\.(\d+)\.")
MEGATRON_DROPPED = ("optimizer", "rng_state")


def _walk(d: Any, path: tuple[str, ...], leaves: list, containers: dict) -> None:
    containers.setdefault(path, {"ordered": type(d) is not dict, "empty": not d})
    for k, v in d.items():
        if isinstance(v, dict):
            _walk(v, (*path, k), leaves, containers)
        elif isinstance(v, TensorRef) and not str(k).endswith("_extra_state"):
            leaves.append((*path, k))


def _layer_of(path: tuple[str, ...]) -> int | None:
    m = _LAYER.search(".".join(path))
    return int(m.group(1)) if m else None


def _renumber(path: tuple[str, ...], delta: int) -> tuple[str, ...]:
    if not delta:
        return path
    out, done = [], False
    for part in path:
        if not done and _LAYER.search(part):
            part = _LAYER.sub(lambda m: f"layers.{int(m.group(1)) + delta}.", part, count=1)
            done = True
        out.append(part)
    return tuple(out)


def megatron_rank_dir(tp: int, pp: int, rank: int, stage: int) -> str:
    return f"mp_rank_{rank:02d}" if pp == 1 else f"mp_rank_{rank:02d}_{stage:03d}"


def plan_megatron(ckpt: Checkpoint, target: Target) -> Plan:
    """Megatron-LM legacy: one model_optim_rng.pt per new (tp, pp) rank, layers renumbered per new stage."""
    from .formats.megatron_legacy import spec_for

    tp_new, pp_new = _degrees(ckpt, target)
    if target.quantize:
        raise PlanError("int8 quantization is written for DeepSpeed layouts only (Megatron-LM has no scale entry)")
    if ckpt.degrees.ep > 1:
        raise PlanError("expert-parallel Megatron checkpoints cannot be resharded yet")
    src_pp = ckpt.degrees.pp
    heads = {f.pp: f.path for f in ckpt.files if f.role == "model_optim_rng" and f.tp == 0}
    if sorted(heads) != list(range(src_pp)):
        raise PlanError(f"model files of tp rank 0 found for pipeline stages {sorted(heads)} of {src_pp}")
    names = {p.name: p for p in ckpt.params}
    order: list[tuple[str, tuple[str, ...], int]] = []  # (global name, global path, source stage)
    containers: dict[int, dict[tuple[str, ...], dict[str, bool]]] = {}
    offset = 0
    head_obj: dict[str, Any] = {}
    for stage in range(src_pp):
        obj = load_torch_metadata(heads[stage]).obj
        if stage == 0:
            head_obj = obj
        model = obj.get("model") if isinstance(obj, dict) else None
        if not isinstance(model, dict):
            raise PlanError(f"{heads[stage]}: no single `model` state dict (virtual pipeline chunks are not "
                            "resharded yet)")
        leaves: list[tuple[str, ...]] = []
        containers[stage] = {}
        _walk(model, (), leaves, containers[stage])
        layers = {lyr for lf in leaves if (lyr := _layer_of(lf)) is not None}
        for lf in leaves:
            path = _renumber(lf, offset)
            name = ".".join(path)
            if name not in names:
                raise PlanError(f"{heads[stage]}: {'.'.join(lf)} is not a parameter the reader found (as {name})")
            order.append((name, path, stage))
        offset += max(layers) + 1 if layers else 0
    n_layers = offset
    if n_layers % pp_new:
        raise PlanError(f"{n_layers} transformer layers do not divide into {pp_new} pipeline stages")
    per_stage = n_layers // pp_new
    untied = bool(ckpt.meta.get("untie_embeddings_and_output_weights"))
    head_key = ("word_embeddings_for_head", "weight")
    has_head = any(path == head_key for _, path, _ in order)
    embed = next((n for n, path, _ in order if path[-2:] == ("word_embeddings", "weight")), None)
    if pp_new > 1 and not untied and not has_head and embed is not None:
        order.append((embed, head_key, -1))  # the last stage's tied copy of the word embeddings
    stage_leaves: dict[int, list[dict[str, Any]]] = {p: [] for p in range(pp_new)}
    vocab_rows = None
    for name, path, stage in order:
        param = names[name]
        layer = _layer_of(path)
        if layer is not None:
            new_stage = layer // per_stage
            new_path = _renumber(path, -new_stage * per_stage)
        else:
            first = stage == 0 and "embedding" in ".".join(path[:-1]) and path != head_key
            new_stage = 0 if first else pp_new - 1
            new_path = path
        spec = spec_for(ckpt, param.name)
        flags = []
        if spec.rule == TpRule.UNKNOWN:
            flags.append("no partition rule matched: split on dim 0; --strict refuses")
            if target.strict:
                raise PlanError(f"{name}: {flags[0]} (--strict)")
        padded = tuple(param.padded_shape or param.shape)
        rows = None
        if spec.vocab and padded:
            true_vocab = ckpt.meta.get("true_vocab_size")
            divisible = getattr(ckpt.meta.get("args"), "make_vocab_size_divisible_by", None)
            rows = padded[0]
            if isinstance(true_vocab, int) and isinstance(divisible, int):
                rows = padded_vocab_size(true_vocab, divisible, tp_new)
            vocab_rows = rows
        full = (rows, *padded[1:]) if rows is not None else padded
        try:
            new_local = local_shape(spec, full, tp_new)
        except ValueError as exc:
            raise PlanError(f"{name}: {exc}") from None
        stage_leaves[new_stage].append({"name": name, "path": new_path, "param": param,
                                        "spec": replace(spec, vocab=False), "rows": rows, "local": new_local,
                                        "label": spec.label, "flags": tuple(flags)})
    for p, leaves in stage_leaves.items():
        if not leaves:
            raise PlanError(f"pipeline stage {p} of {pp_new} would hold no parameters")
    dropped = [k for k in MEGATRON_DROPPED if head_obj.get(k) is not None]
    items = []
    tag = ckpt.tag
    for p in range(pp_new):
        leaves = stage_leaves[p]
        template = containers[0 if p == 0 else src_pp - 1 if p == pp_new - 1 else min(p, src_pp - 1)]
        ctypes = {path: info["ordered"] for st in containers.values() for path, info in st.items()}
        ctypes[("word_embeddings_for_head",)] = True
        empty = [path for path, info in template.items() if info["empty"]]
        largest = max(leaves, key=lambda e: prod(e["local"]))
        read = sum(prod(f.tensor.shape) * f.tensor.itemsize for e in leaves for f in e["param"].fragments)
        write = sum(prod(e["local"]) * ITEMSIZE.get(e["param"].dtype, 4) for e in leaves) + 4096
        for t in range(tp_new):
            rel = f"{tag}/{megatron_rank_dir(tp_new, pp_new, t, p)}/model_optim_rng.pt"
            items.append(PlanItem(
                id=f"megatron:{t}:{p}", kind="reshard_megatron", name=rel.split("/", 1)[1],
                rule=", ".join(dict.fromkeys(e["label"] for e in leaves)), spec=largest["spec"],
                outputs=(rel,), target_shapes=(largest["local"],), read_bytes=read, write_bytes=write,
                peak_bytes=write * 3, flags=tuple(f"{e['name']}: {f}" for e in leaves for f in e["flags"]),
                args={"src": heads[0], "tp": tp_new, "pp": pp_new, "rank": t, "stage": p, "drop": dropped,
                      "padded_vocab_size": vocab_rows, "containers": ctypes, "empty": empty,
                      "tensors": [{k: e[k] for k in ("name", "path", "param", "spec", "rows", "local")}
                                  for e in leaves]},
            ))
    warnings = list(ckpt.warnings)
    if dropped:
        warnings.append(f"model weights only: {', '.join(dropped)} not resharded and not written "
                        "(a resumed run starts them afresh)")
    return Plan(source_path=ckpt.path, source_format=str(ckpt.format), target=target, items=tuple(items),
                layout_dirs=(tag,), finalize=tuple(_tracker_items(ckpt, tag)), warnings=tuple(warnings),
                source_degrees=str(ckpt.degrees), target_degrees=f"tp={tp_new} pp={pp_new} dp={ckpt.degrees.dp}")
