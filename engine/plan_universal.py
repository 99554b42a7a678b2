"""Plan a ZeRO (any stage, any tp/pp/dp) → DeepSpeed universal conversion: one item per parameter."""

from __future__ import annotations

import os

from .assemble import fragment_bytes
from .errors import PlanError
from .formats.deepspeed import param_spec
from .layout import Checkpoint, Format, Param
from .plan import Plan, PlanItem, Target
from .rules import TpRule

UNIVERSAL_STATES = ("fp32", "exp_avg", "exp_avg_sq")


def universal_tag(ckpt: Checkpoint, target: Target) -> str:
    return target.tag or f"{ckpt.tag}_universal"


def _param_item(ckpt: Checkpoint, p: Param, tag: str, uc: dict, autotp: bool) -> PlanItem:
    spec = param_spec(ckpt, p.name, deepspeed_compat=True)
    base = f"{tag}/zero/{p.name}"
    flags = list(p.flags)
    states = [s for s in UNIVERSAL_STATES if any(f.state == s for f in p.fragments)]
    fp32_from_weight = False
    if "fp32" not in states and states and any(f.state == "weight" and f.tensor.dtype == "float32"
                                               for f in p.fragments):
        states.insert(0, "fp32")  # ZeRO-0 fp32: the module weights are the fp32 master weights
        fp32_from_weight = True
    if p.tied_to is not None or p.frozen or not states:
        states = ["fp32"]
        source_state = "weight" if any(f.state == "weight" for f in p.fragments) else "fp32"
        if not any(f.state == source_state for f in p.fragments):
            raise PlanError(f"{p.name}: no fragments to read (neither fp32 master nor model weights)")
    else:
        source_state = None
    if spec.rule == TpRule.UNKNOWN:
        flags.append("unknown name under tp>1: concatenated on dim 0 (DeepSpeed's default); --strict refuses")
    read = sum(fragment_bytes(p, s) for s in (states if source_state is None else [source_state]))
    read += fragment_bytes(p, "weight") if fp32_from_weight else 0
    elem = p.numel
    write = elem * 4 * len(states)
    has_step = any(f.state == "step" for f in p.fragments) or p.name in (ckpt.meta.get("int_steps") or {})
    outputs = tuple(f"{base}/{s}.pt" for s in states) + ((f"{base}/step.pt",) if has_step and not source_state else ())
    padded = p.padded_shape or p.shape
    return PlanItem(
        id=f"param:{p.name}", kind="universal_param", name=p.name, rule=spec.label, spec=spec, param=p,
        outputs=outputs, target_shapes=(p.shape,), read_bytes=read, write_bytes=write + 600 * len(outputs),
        peak_bytes=3 * _numel(padded) * 4, flags=tuple(flags),
        args={"states": tuple(states), "source_state": source_state, "true_vocab": ckpt.meta.get("original_vocab_size"),
              "cat_dim": not autotp, "step": has_step and not source_state,
              "int_step": (ckpt.meta.get("int_steps") or {}).get(p.name), "fp32_from_weight": fp32_from_weight},
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def plan_universal(ckpt: Checkpoint, target: Target) -> Plan:
    if ckpt.format != Format.DEEPSPEED:
        raise PlanError(f"universal conversion reads DeepSpeed checkpoints; this one is {ckpt.format}")
    if ckpt.zero_stage is None:
        raise PlanError("not a DeepSpeed ZeRO checkpoint")
    tag = universal_tag(ckpt, target)
    uc = dict(ckpt.meta.get("universal_checkpoint_info") or {})
    autotp = "affine_map" in uc
    items: list[PlanItem] = []
    for p in ckpt.params:
        if ckpt.zero_stage == 3 and p.tied_to is not None and not p.fragments:
            continue
        if p.tied_to is not None and not p.fragments:
            continue
        item = _param_item(ckpt, p, tag, uc, autotp)
        if target.strict and item.flags:
            raise PlanError(f"{p.name}: {item.flags[0]} (--strict)")
        items.append(item)
    model_files = list(ckpt.meta.get("model_files") or ())
    for path in model_files:
        size = os.path.getsize(path)
        name = os.path.basename(path)
        items.append(PlanItem(id=f"copy:{name}", kind="copy", name=name, outputs=(f"{tag}/{name}",),
                              read_bytes=size, write_bytes=size, peak_bytes=0, args={"src": path}))
    optim_files = list(ckpt.meta.get("optim_files") or ())
    if not optim_files and ckpt.zero_stage != 0:
        raise PlanError("no optimizer files: nothing to convert")
    items.append(PlanItem(id="optimizer_state", kind="universal_optimizer_state", name="zero/optimizer_state.pt",
                          outputs=(f"{tag}/zero/optimizer_state.pt",), read_bytes=0, write_bytes=4096,
                          args={"optim_file": optim_files[0] if optim_files else model_files[0],
                                "zero_stage": ckpt.zero_stage}))
    finalize = [  # last, and without torch: the tracker file names a complete output
        PlanItem(id="latest_universal", kind="write_file", name="latest_universal", outputs=("latest_universal",),
                 write_bytes=len(tag), args={"text": tag}),
    ]
    warnings = list(ckpt.warnings)
    if ckpt.zero_stage == 0:
        warnings.append("ZeRO-0: DeepSpeed's ds_to_universal refuses this checkpoint; states come from the "
                        "model-state files")
    frozen = [p.name for p in ckpt.params if p.frozen]
    if frozen and ckpt.zero_stage == 3:
        warnings.append(f"{len(frozen)} frozen parameters kept (DeepSpeed's ZeRO-3 converter drops them)")
    return Plan(
        source_path=ckpt.path, source_format=str(ckpt.format), target=target, items=tuple(items),
        layout_dirs=(tag, f"{tag}/zero", *(f"{tag}/zero/{i.name}" for i in items if i.kind == "universal_param")),
        finalize=tuple(finalize), warnings=tuple(warnings), source_degrees=str(ckpt.degrees),
        target_degrees="universal (any tp/pp/dp at load)",
    )


__all__ = ["plan_universal", "universal_tag"]
