"""Write one parameter of a DeepSpeed universal checkpoint: zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt."""

from __future__ import annotations

import os
from typing import Any

from ..assemble import assemble_state, read_step
from ..plan import PlanItem
from ..rules import TpRule
from ..safe_unpickle import load_torch_metadata
from .torch_save import materialize, save_atomic

ZERO12_DROP = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")


def _payload(item: PlanItem, tensor: Any) -> dict[str, Any]:
    spec = item.spec
    out: dict[str, Any] = {}
    if spec is not None and item.args.get("cat_dim") and item.args.get("source_state") is None:
        if spec.rule not in (TpRule.REPLICATED, TpRule.AVERAGE):
            out["cat_dim"] = spec.dim if spec.dim is not None else 0
        if spec.rule == TpRule.SWIGLU:
            out["param_n_sub_params"] = 2
    if spec is not None and spec.vocab and item.args.get("source_state") is None:
        out["vocab_tensor"] = True
    out["param"] = tensor
    return out


def write_universal_param(item: PlanItem, root: str, report: Any = None) -> int:
    """Assemble every state of the parameter and write its files; returns bytes written."""
    import torch

    p = item.param
    assert p is not None and item.spec is not None
    written = 0
    source_state = item.args.get("source_state")
    true_vocab = item.args.get("true_vocab")
    for state, rel in zip(item.args["states"], item.outputs):
        src = source_state or state
        if state == "fp32" and item.args.get("fp32_from_weight"):
            src = "weight"
        tensor = assemble_state(p, item.spec, src, true_vocab=true_vocab)
        if tensor.dtype != torch.float32:
            tensor = tensor.float()
        tensor = tensor.contiguous()
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()  # e.g. vocabulary rows narrowed off: save only what is kept
        written += save_atomic(_payload(item, tensor), os.path.join(root, rel))
        if report is not None:
            report(written)
    if item.args.get("step"):
        step = read_step(p)
        if step is None:
            step = item.args.get("int_step")
        written += save_atomic(step, os.path.join(root, item.outputs[-1]))
    return written


def write_optimizer_state(item: PlanItem, root: str, report: Any = None) -> int:
    """zero/optimizer_state.pt from the first optimizer file, as DeepSpeed's converter writes it."""
    obj = load_torch_metadata(item.args["optim_file"]).obj
    osd = obj.get("optimizer_state_dict") if isinstance(obj, dict) else None
    if osd is None:  # ZeRO-0: the optimizer lives in the model states
        osd = {"optimizer": obj.get("optimizer")}
    if item.args["zero_stage"] == 3:
        state = dict(osd)
        inner = state.get("optimizer_state_dict") or {}
        state["param_groups"] = inner.get("param_groups", [])
    else:
        state = {k: v for k, v in osd.items() if k not in ZERO12_DROP}
        base = osd.get("base_optimizer_state") or {}
        groups = base.get("param_groups") if isinstance(base, dict) else None
        if groups is None and isinstance(osd.get("optimizer"), dict):
            inner = osd["optimizer"]
            groups = (inner.get("optimizer_state_dict") or inner).get("param_groups")
        state["param_groups"] = groups or []
    return save_atomic(materialize(state), os.path.join(root, item.outputs[0]), standins=True)
