"""Write the files of a resharded checkpoint: DeepSpeed layer and mp_rank files, Megatron-LM rank files; int8."""

from __future__ import annotations

import os
from typing import Any

from ..assemble import assemble_state
from ..plan import PlanItem
from ..quantize import F_KEYS, QUANT_ENTRY, dequant_error, entry_multipliers, quantize_module, scale_slot
from ..rules import merge, split
from ..safe_unpickle import load_torch_metadata
from ..standins import StandIn
from .torch_save import materialize, save_atomic


def _fit_rows(tensor: Any, rows: int | None) -> Any:
    """Re-pad a vocabulary tensor to `rows` rows (zero rows added, or padding rows dropped)."""
    import torch

    if rows is None or tensor.shape[0] == rows:
        return tensor
    if tensor.shape[0] > rows:
        return tensor.narrow(0, 0, rows)
    pad = torch.zeros((rows - tensor.shape[0], *tensor.shape[1:]), dtype=tensor.dtype)
    return torch.cat([tensor, pad], dim=0)


def _piece(name: str, full: Any, e: dict[str, Any], tp: int, rank: int) -> Any:
    """Rank `rank`'s slice of a global tensor: vocabulary re-padded, split by the rule, checked against the plan."""
    full = _fit_rows(full, e["rows"])
    piece = split(e["spec"], full, tp)[rank]
    if tuple(piece.shape) != tuple(e["local"]):
        raise ValueError(f"{name}: split gave {tuple(piece.shape)}, planned {tuple(e['local'])}")
    return piece.clone().contiguous()


def _layer_piece(e: dict[str, Any], tp: int, rank: int) -> Any:
    return _piece(e["name"], assemble_state(e["param"], e["spec"], "weight"), e, tp, rank)


def quantize_rank(module: dict[str, Any], quant: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """int8 `quantize_module` of one target rank's tensors; the QUANT_ENTRY gets per-weight dequantization errors
    (`errors`: name -> {max, mean, bound = max|w|/127})."""
    qmod, entry = quantize_module(module, mp_size=quant["mp_size"], merge_count=quant["merge_count"],
                                  bits=quant["bits"], groups=quant["groups"],
                                  mlp_extra_grouping=quant["mlp_extra_grouping"])
    errors = {}
    for rec in entry[F_KEYS]:
        name = rec["name"]
        mult, _ = entry_multipliers(entry, name)
        err_max, err_mean = dequant_error(module[name], qmod[name], mult, groups=rec["groups"], parts=rec["parts"],
                                          merge_dim=rec["merge_dim"])
        bound = float(module[name].float().abs().max()) / 127
        errors[name] = {"max": err_max, "mean": err_mean, "bound": bound}
    entry["errors"] = errors
    return qmod, entry


def write_reshard_layer(item: PlanItem, root: str, report: Any = None) -> int:
    """One layer file of one new TP rank: each tensor assembled globally, re-padded, split, rank's slice kept."""
    out: dict[str, Any] = {}
    tp, rank, quant = item.args["tp"], item.args["rank"], item.args.get("quant")
    for e in item.args["tensors"]:
        piece = _layer_piece(e, tp, rank)
        if quant and scale_slot(e["name"]):  # the same int8 as the stage's mp_rank file records scales for
            piece = quantize_rank({e["name"]: piece}, {**quant})[0][e["name"]]
        out[e["key"]] = piece
    return save_atomic(out, os.path.join(root, item.outputs[0]))


def _with_state(obj: StandIn, updates: dict[str, Any]) -> StandIn:
    """A copy of a stand-in (e.g. argparse.Namespace) with some pickled-state fields replaced."""
    state = obj.state
    new = type(obj).__new__(type(obj), *obj.args)
    if isinstance(state, dict):
        new.__setstate__(materialize({**state, **updates}))
    else:
        new.__setstate__(materialize(state))
    return new


def write_reshard_mp_rank(item: PlanItem, root: str, report: Any = None) -> int:
    """mp_rank_XX_model_states.pt: the source's rank-0 metadata with the new degrees and local shapes."""
    import torch

    a = item.args
    obj = materialize(load_torch_metadata(a["src"]).obj)
    tp, pp = a["tp"], a["pp"]
    obj["mp_world_size"] = tp * pp
    obj["checkpoint_parallel_dimensions"] = {"pp_degree": pp, "tp_degree": tp}
    groups = obj.get("param_shapes")
    if isinstance(groups, list):
        cls = type(groups[0]) if groups else dict
        obj["param_shapes"] = [cls((n, torch.Size(s)) for n, s in g) for g in a["param_shapes"]]
    vocab = a.get("padded_vocab_size")
    uc = obj.get("universal_checkpoint_info")
    if isinstance(uc, dict) and vocab is not None and "padded_vocab_size" in uc:
        obj["universal_checkpoint_info"] = {**uc, "padded_vocab_size": vocab}
    _update_args(obj, tp, pp, vocab)
    quant = a.get("quant")
    if quant:
        module = {e["name"]: _layer_piece(e, tp, a["rank"]) for e in a["quant_tensors"]}
        obj[QUANT_ENTRY] = quantize_rank(module, quant)[1]
    return save_atomic(obj, os.path.join(root, item.outputs[0]), standins=True)


def _update_args(obj: dict[str, Any], tp: int, pp: int, vocab: int | None) -> None:
    """The `args` Namespace with the new degrees (and padded vocabulary when it changed)."""
    args = obj.get("args")
    if isinstance(args, StandIn):
        updates: dict[str, Any] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
        state = args.state if isinstance(args.state, dict) else {}
        if "transformer_pipeline_model_parallel_size" in state:
            updates["transformer_pipeline_model_parallel_size"] = pp
        if "model_parallel_size" in state and state["model_parallel_size"] is not None:
            updates["model_parallel_size"] = tp
        old_mp = int(state.get("tensor_model_parallel_size") or 1) * int(state.get("pipeline_model_parallel_size") or 1)
        if isinstance(state.get("world_size"), int) and state["world_size"] % old_mp == 0:
            updates["world_size"] = state["world_size"] // old_mp * tp * pp  # data parallelism kept
        if vocab is not None:
            updates["padded_vocab_size"] = vocab
        obj["args"] = _with_state(args, updates)


def _rebuild(module: Any, values: dict[str, Any], prefix: str = "") -> Any:
    """The source module's nesting and container types with every tensor leaf replaced by `values[name]`."""
    out = type(module)() if isinstance(module, dict) else {}
    for k, v in module.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out[k] = _rebuild(v, values, name + ".")
        else:
            out[k] = values[name] if name in values else materialize(v)
    return out


def write_reshard_module(item: PlanItem, root: str, report: Any = None) -> int:
    """mp_rank_TT_model_states.pt of a non-pipeline checkpoint: rank TT's split of every module tensor, the rest
    of the source's rank-0 file with the new degrees; the optimizer state dropped (it is not resharded)."""
    import torch

    from ..tensor_io import read_tensor

    a = item.args
    tp, rank = a["tp"], a["rank"]
    raw = load_torch_metadata(a["src"]).obj
    values: dict[str, Any] = {}
    for e in a["tensors"]:
        refs = e["refs"][:1] if e["buffer"] else e["refs"]
        full = merge(e["spec"], [read_tensor(r) for r in refs])
        values[e["name"]] = _piece(e["name"], full, e, tp, rank)
    quant = a.get("quant")
    entry = None
    if quant:
        values, entry = quantize_rank(values, quant)
    # the source's keys in order, `module` where it was; a stale quantization entry is not carried over
    obj = {k: (_rebuild(v, values) if k == "module" else materialize(v)) for k, v in raw.items() if k != QUANT_ENTRY}
    if entry is not None:
        obj[QUANT_ENTRY] = entry
    if "optimizer" in obj:
        obj["optimizer"] = None
    obj["mp_world_size"] = tp
    obj["checkpoint_parallel_dimensions"] = {**(obj.get("checkpoint_parallel_dimensions") or {}),
                                             "pp_degree": 1, "tp_degree": tp}
    local = {e["name"]: tuple(e["local"]) for e in a["tensors"]}
    groups = obj.get("param_shapes")
    if isinstance(groups, list):
        obj["param_shapes"] = [type(g)((n, torch.Size(local.get(n, s))) for n, s in g.items()) for g in groups]
    vocab = a.get("padded_vocab_size")
    uc = obj.get("universal_checkpoint_info")
    if isinstance(uc, dict) and vocab is not None and "padded_vocab_size" in uc:
        obj["universal_checkpoint_info"] = {**uc, "padded_vocab_size": vocab}
    _update_args(obj, tp, 1, vocab)
    return save_atomic(obj, os.path.join(root, item.outputs[0]), standins=True)


def write_reshard_megatron(item: PlanItem, root: str, report: Any = None) -> int:
    """model_optim_rng.pt of one new (tp, pp) rank of a Megatron-LM legacy checkpoint: the stage's parameters
    (layers renumbered from 0) split for the rank, nested as the source nests them; top-level keys of the
    source's first rank file with the new degrees in `args`; optimizer and RNG state dropped."""
    from collections import OrderedDict

    a = item.args
    tp, pp, rank = a["tp"], a["pp"], a["rank"]
    raw = load_torch_metadata(a["src"]).obj
    containers: dict[tuple[str, ...], bool] = a["containers"]
    model: dict[str, Any] = OrderedDict() if containers.get((), False) else {}

    def node(path: tuple[str, ...]) -> dict[str, Any]:
        d = model
        for i, k in enumerate(path):
            if k not in d:
                d[k] = OrderedDict() if containers.get(tuple(path[: i + 1]), False) else {}
            d = d[k]
        return d

    for path in a["empty"]:
        node(tuple(path))
    for e in a["tensors"]:
        path = tuple(e["path"])
        node(path[:-1])[path[-1]] = _layer_piece(e, tp, rank)
    obj: dict[str, Any] = {}
    for k, v in raw.items():
        if k in a["drop"]:
            continue
        obj[k] = model if k == "model" else materialize(v)
    _update_args(obj, tp, pp, a.get("padded_vocab_size"))
    return save_atomic(obj, os.path.join(root, item.outputs[0]), standins=True)
