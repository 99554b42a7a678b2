"""Write the files of a resharded Megatron-DeepSpeed pipeline checkpoint: layer files and mp_rank metadata."""

from __future__ import annotations

import os
from typing import Any

from ..assemble import assemble_state
from ..plan import PlanItem
from ..rules import split
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


def write_reshard_layer(item: PlanItem, root: str, report: Any = None) -> int:
    """One layer file of one new TP rank: each tensor assembled globally, re-padded, split, rank's slice kept."""
    out: dict[str, Any] = {}
    tp, rank = item.args["tp"], item.args["rank"]
    for e in item.args["tensors"]:
        full = assemble_state(e["param"], e["spec"], "weight")
        full = _fit_rows(full, e["rows"])
        piece = split(e["spec"], full, tp)[rank]
        if tuple(piece.shape) != tuple(e["local"]):
            raise ValueError(f"{e['name']}: split gave {tuple(piece.shape)}, planned {tuple(e['local'])}")
        out[e["key"]] = piece.clone().contiguous()
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
    args = obj.get("args")
    if isinstance(args, StandIn):
        updates: dict[str, Any] = {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
        if isinstance(args.state, dict) and "transformer_pipeline_model_parallel_size" in args.state:
            updates["transformer_pipeline_model_parallel_size"] = pp
        if vocab is not None:
            updates["padded_vocab_size"] = vocab
        obj["args"] = _with_state(args, updates)
    return save_atomic(obj, os.path.join(root, item.outputs[0]), standins=True)
