"""Write one parameter of a DeepSpeed universal checkpoint: zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from ..assemble import assemble_state, copy_runs, merged_shape, read_step
from ..plan import PlanItem
from ..rules import TpRule
from ..safe_unpickle import load_torch_metadata
from ..tensor_io import raw_bytes
from ..tensorref import TensorRef
from .torch_save import materialize, save_atomic
from .torch_zip import STORAGE_NAMES, RawTensor, save_torch_zip

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
    p = item.param
    assert p is not None and item.spec is not None
    written = 0
    source_state = item.args.get("source_state")
    true_vocab = item.args.get("true_vocab")
    for state, rel in zip(item.args["states"], item.outputs):
        src = source_state or state
        if state == "fp32" and item.args.get("fp32_from_weight"):
            src = "weight"
        raw = _raw_tensor(item, src)
        if raw is not None:  # a plain concatenation of fp32 fragments: bytes go file to file, no torch needed
            written += save_torch_zip(_payload(item, raw), os.path.join(root, rel))
            if report is not None:
                report(written)
            continue
        import torch

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
        ref = next((f.tensor for f in p.fragments if f.state == "step"), None)
        if ref is not None and ref.dtype in STORAGE_NAMES and ref.is_contiguous:
            step: Any = RawTensor(ref.dtype, ref.shape, lambda ref=ref: [raw_bytes(ref, 0, ref.numel)])
            written += save_torch_zip(step, os.path.join(root, item.outputs[-1]))
        else:
            step = read_step(p) if ref is not None else item.args.get("int_step")
            written += save_atomic(step, os.path.join(root, item.outputs[-1]))
    return written


def _raw_tensor(item: PlanItem, state: str) -> RawTensor | None:
    """The state as a RawTensor streamed from its fragments, when that is exact (fp32 fragments, dim-0 merge)."""
    p = item.param
    assert p is not None and item.spec is not None
    frags = [f for f in p.fragments if f.state == state]
    if not frags or any(f.tensor.dtype != "float32" for f in frags):
        return None
    true_vocab = item.args.get("true_vocab")
    runs = copy_runs(p, item.spec, state, true_vocab=true_vocab)
    if runs is None:
        return None
    expected = 0
    for _, _, count, dst in runs:
        if dst != expected:
            return None
        expected += count
    shape = merged_shape(p, item.spec, true_vocab=true_vocab)

    def chunks() -> Iterable[memoryview]:
        for frag, first, count, _ in runs:
            yield raw_bytes(frag.tensor, first, count)

    return RawTensor("float32", shape, chunks)


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
    return save_torch_zip(_rawify(state), os.path.join(root, item.outputs[0]))


def _rawify(obj: Any) -> Any:
    """TensorRefs in an object tree become RawTensors streamed from the source (torch only for odd layouts)."""
    if isinstance(obj, TensorRef):
        if obj.is_contiguous and obj.dtype in STORAGE_NAMES:
            return RawTensor(obj.dtype, obj.shape, lambda ref=obj: [raw_bytes(ref, 0, ref.numel)])
        return materialize(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _rawify(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_rawify(v) for v in obj]
    if isinstance(obj, tuple) and type(obj) is tuple:
        return tuple(_rawify(v) for v in obj)
    return obj
