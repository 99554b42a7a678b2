"""Write a many-rank DeepSpeed 0.19.8 ZeRO-1 pipeline checkpoint whose layout matches what the real engine writes.

Usage: python bench/make_many_ranks.py OUT [--dp 256 --tp 2 --pp 2 --layers 8 --hidden 64] [--verify]

The model is the one of the real fixture `deepspeed-0.19.8/md3d_pp2_tp2_fp32_ws4` (Megatron-DeepSpeed style 3D
parallelism: per block a norm, a column-parallel fc1 and a row-parallel fc2; a final norm layer), scaled up.
Files, keys, value types and the ZeRO-1 arithmetic follow DeepSpeed 0.19.8 (`engine._save_checkpoint`,
`DeepSpeedZeroOptimizer.state_dict`, `PipelineModule.save_state_dict`): fp32 flat groups padded to a multiple of
2*dp, partitions of P = padded/dp elements, the fp32 partition saved without its padding, Adam moments with it,
`param_slice_mappings` = fragment_address(numel, start) of each parameter overlapping the rank's partition.
DeepSpeed is not needed: tiny classes under DeepSpeed's global names are registered in fake modules (in this
process only) so the pickles name exactly the globals real files name. `--verify` checks the arithmetic against
every real ZeRO-1/2 fixture and compares the key trees of generated files with the real md3d fixture.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import re
import sys
import time
import types
import zlib
from collections import OrderedDict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
MD3D = FIXTURES / "deepspeed-0.19.8/md3d_pp2_tp2_fp32_ws4/ckpt/global_step2"
DS_VERSION = "0.19.8"
TAG = "global_step10"
STEPS = 10
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    "steps_per_print": 1000,
    "zero_optimization": {"stage": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": 0.001, "torch_adam": True}},
    "gradient_clipping": 1.0,
}
UC_INFO = {  # Megatron-DeepSpeed style patterns, as in the md3d fixture
    "universal_checkpoint_version": 0.2,
    "tp_replicated_parameter_patterns": [r".*\.norm\.weight$", r".*\.norm\.bias$", r".*\.fc2\.bias$"],
    "parameter_with_row_parallelism_patterns": [r".*\.fc2\.weight$"],
}


# -- DeepSpeed's classes under their real global names ------------------------------------------------------------
def install_fake_deepspeed() -> types.SimpleNamespace:
    """Register stand-in classes in sys.modules under DeepSpeed's module paths (this process only)."""

    @dataclasses.dataclass
    class fragment_address:  # noqa: N801  (DeepSpeed's name)
        numel: int
        start: int

    class ZeroStageEnum(int, enum.Enum):
        disabled = 0
        optimizer_states = 1
        gradients = 2
        weights = 3
        max_stage = 3

    class LossScaler:
        def __init__(self, scale: float = 1.0) -> None:
            self.cur_scale = scale
            self.dynamic = False

    classes = {
        "deepspeed.utils.tensor_fragment": {"fragment_address": fragment_address},
        "deepspeed.runtime.zero.config": {"ZeroStageEnum": ZeroStageEnum},
        "deepspeed.runtime.fp16.loss_scaler": {"LossScaler": LossScaler},
    }
    for module, members in classes.items():
        parts = module.split(".")
        for i in range(1, len(parts) + 1):
            name = ".".join(parts[:i])
            sys.modules.setdefault(name, types.ModuleType(name))
        mod = sys.modules[module]
        for attr, cls in members.items():
            cls.__module__ = module
            cls.__qualname__ = attr
            cls.__name__ = attr
            setattr(mod, attr, cls)
    return types.SimpleNamespace(fragment_address=fragment_address, ZeroStageEnum=ZeroStageEnum,
                                 LossScaler=LossScaler)


# -- model and DeepSpeed arithmetic -------------------------------------------------------------------------------
def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """deepspeed.runtime.utils.partition_uniform: stage boundaries over pipeline layers."""
    if num_items <= num_parts:
        return [min(i, num_items) for i in range(num_parts + 1)]
    chunk = num_items // num_parts
    parts = [i * chunk for i in range(num_parts + 1)]
    for i in range(num_items - chunk * num_parts):
        for j in range(i + 1, num_parts + 1):
            parts[j] += 1
    return parts


def layer_params(layers: int, hidden: int, tp: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Per pipeline layer, its (layer-relative name, TP-local shape) list: blocks, then a final norm."""
    ffn = 4 * hidden // tp
    block = [("norm.weight", (hidden,)), ("norm.bias", (hidden,)), ("fc1.weight", (ffn, hidden)),
             ("fc1.bias", (ffn,)), ("fc2.weight", (hidden, ffn)), ("fc2.bias", (hidden,))]
    return [list(block) for _ in range(layers)] + [[("weight", (hidden,)), ("bias", (hidden,))]]


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def zero1_rank(numels: list[int], dp: int, rank: int) -> tuple[int, int, list[tuple[int, int, int]]]:
    """DeepSpeedZeroOptimizer (ZeRO-1/2) for one flat group: (P, padding in this rank's partition,
    [(param index, fragment numel, fragment start inside the partition)])."""
    total = sum(numels)
    alignment = 2 * dp  # nccl_start_alignment_factor * dp
    padded = total + (alignment - total % alignment) % alignment
    part = padded // dp
    lo, hi = rank * part, (rank + 1) * part
    if total <= lo:
        padding = part
    elif total < hi:
        padding = hi - total
    else:
        padding = 0
    frags = []
    off = 0
    for i, n in enumerate(numels):
        start, end = max(off, lo), min(off + n, hi)
        if start < end:
            frags.append((i, end - start, start - lo))
        off += n
    return part, padding, frags


# -- writing --------------------------------------------------------------------------------------------------------
def write_checkpoint(out: Path, dp: int, tp: int, pp: int, layers: int, hidden: int, seed: int = 0) -> dict:
    import torch

    ds = install_fake_deepspeed()
    per_layer = layer_params(layers, hidden, tp)
    bounds = partition_uniform(len(per_layer), pp)
    tag_dir = out / TAG
    tag_dir.mkdir(parents=True, exist_ok=False)
    (out / "latest").write_text(TAG)
    (out / "zero_to_fp32.py").write_text("# DeepSpeed copies its zero_to_fp32.py script here (left out).\n")
    replicated = [re.compile(p) for p in UC_INFO["tp_replicated_parameter_patterns"]]
    files = 0
    for stage in range(pp):
        stage_layers = range(bounds[stage], bounds[stage + 1])
        names = [(f"{li}.{n}", shape) for li in stage_layers for n, shape in per_layer[li]]
        numels = [numel(s) for _, s in names]
        total = sum(numels)
        part = zero1_rank(numels, dp, 0)[0]
        for t in range(tp):
            mp = stage * tp + t
            # values: TP-replicated parameters (and their Adam moments) are identical on every TP rank, as after
            # real training (DeepSpeed's ds_to_universal asserts it); sharded ones differ per rank
            states = []
            for scale, positive in ((0.02, False), (1e-3, False), (1e-6, True)):
                pieces = []
                for (name, _), n in zip(names, numels):
                    rep = any(r.match(name) for r in replicated)
                    key = f"{seed}/{stage}/{-1 if rep else t}/{name}/{scale}"
                    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
                    pieces.append((torch.rand(n, generator=gen) if positive else torch.randn(n, generator=gen)) * scale)
                vec = torch.zeros(part * dp)
                vec[:total] = torch.cat(pieces)
                states.append(vec)
            flat, exp_avg, exp_avg_sq = states
            # layer files: layer-relative keys, each tensor its own storage (DeepSpeed clones before saving)
            off = 0
            for li in stage_layers:
                sd = OrderedDict()
                for n, shape in per_layer[li]:
                    sd[n] = flat[off : off + numel(shape)].view(shape).clone()
                    off += numel(shape)
                torch.save(sd, tag_dir / f"layer_{li:02d}-model_{t:02d}-model_states.pt")
                files += 1
            torch.save(model_states(names, dp, tp, pp), tag_dir / f"mp_rank_{mp:02d}_model_states.pt")
            files += 1
            for d in range(dp):
                _, padding, frags = zero1_rank(numels, dp, d)
                window = slice(d * part, (d + 1) * part)
                osd = optimizer_state(ds, names, numels, frags, padding, dp, flat[window][: part - padding].clone(),
                                      exp_avg[window].clone(), exp_avg_sq[window].clone())
                torch.save({"optimizer_state_dict": osd, "ds_config": DS_CONFIG, "ds_version": DS_VERSION},
                           tag_dir / f"zero_pp_rank_{d}_mp_rank_{mp:02d}_optim_states.pt")
                files += 1
    return {"files": files, "stage_bounds": bounds}


def model_states(names: list[tuple[str, tuple[int, ...]]], dp: int, tp: int, pp: int) -> dict:
    import torch

    return {
        "module": None,
        "buffer_names": [],
        "optimizer": None,
        "param_shapes": [OrderedDict((n, torch.Size(s)) for n, s in names)],
        "frozen_param_shapes": None,
        "shared_params": {},
        "frozen_param_fragments": None,
        "lr_scheduler": None,
        "data_sampler": None,
        "random_ltd": None,
        "skipped_steps": 0,
        "global_steps": STEPS,
        "global_samples": STEPS * DS_CONFIG["train_micro_batch_size_per_gpu"] * DS_CONFIG[
            "gradient_accumulation_steps"] * dp,
        "dp_world_size": dp,
        "mp_world_size": pp * tp,
        "checkpoint_parallel_dimensions": {"pp_degree": pp, "tp_degree": tp},
        "ds_config": DS_CONFIG,
        "ds_version": DS_VERSION,
        "universal_checkpoint_info": UC_INFO,
    }


def optimizer_state(ds: types.SimpleNamespace, names: list[tuple[str, tuple[int, ...]]], numels: list[int],
                    frags: list[tuple[int, int, int]], padding: int, dp: int, fp32: Any, exp_avg: Any,
                    exp_avg_sq: Any) -> dict:
    import torch

    group = {"lr": 0.001, "betas": (0.9, 0.999), "eps": 1e-08, "weight_decay": 0.01, "amsgrad": False,
             "maximize": False, "foreach": None, "capturable": False, "differentiable": False, "fused": None,
             "decoupled_weight_decay": True, "params": [0]}
    return {
        "loss_scaler": ds.LossScaler(1.0),
        "dynamic_loss_scale": False,
        "overflow": False,
        "clip_grad": 1.0,
        "base_optimizer_state": {
            "state": {0: {"step": torch.tensor(float(STEPS)), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}},
            "param_groups": [group],
        },
        "single_partition_of_fp32_groups": [fp32],
        "zero_stage": ds.ZeroStageEnum(1),
        "group_paddings": [padding],
        "param_alignment_paddings": [[0] * len(numels)],
        "partition_count": [dp],
        "ds_version": DS_VERSION,
        "param_slice_mappings": [OrderedDict((names[i][0], ds.fragment_address(numel=n, start=s))
                                             for i, n, s in frags)],
    }


# -- verification against the real fixtures ----------------------------------------------------------------------
def signature(obj: Any) -> Any:
    """The shape of an object tree as the safe reader sees it: keys, types, tensor ranks and dtypes (no values,
    and parameter names abstracted away)."""
    from engine.standins import StandIn
    from engine.tensorref import TensorRef

    if isinstance(obj, TensorRef):
        return f"tensor{len(obj.shape)}d:{obj.dtype}"
    if isinstance(obj, StandIn):
        return (type(obj).qualname, tuple(sorted((k, signature(v)) for k, v in obj.fields().items())))
    if isinstance(obj, dict):
        if all(isinstance(k, str) and "." not in k for k in obj):
            return (type(obj).__name__, tuple((k, signature(v)) for k, v in obj.items()))
        return (type(obj).__name__ + "<names>", tuple(sorted({repr(signature(v)) for v in obj.values()})))
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(sorted({repr(signature(v)) for v in obj})))
    return type(obj).__name__


def verify(out: Path, dp: int, tp: int, pp: int) -> list[str]:
    """Problems found (empty when the generated files look like the real ones)."""
    sys.path.insert(0, str(ROOT))
    from engine.safe_unpickle import load_torch_metadata

    problems = []
    # 1. the arithmetic reproduces every real ZeRO-1/2 DeepSpeedZeroOptimizer fixture
    checked = 0
    for optim in sorted((FIXTURES / "deepspeed-0.19.8").glob("*/ckpt/*/*zero_pp_rank_*_optim_states.pt")):
        osd = load_torch_metadata(str(optim)).obj["optimizer_state_dict"]
        if "zero_stage" not in osd or int(osd["zero_stage"]) not in (1, 2):
            continue  # BF16_Optimizer / ZeRO-3 lay their partitions out differently
        mp = optim.name.split("_mp_rank_")[1][:2]
        d = int(optim.name.split("zero_pp_rank_")[1].split("_")[0])
        model = load_torch_metadata(str(optim.parent / f"mp_rank_{mp}_model_states.pt")).obj
        for g, shapes in enumerate(model["param_shapes"]):
            ndp = osd["partition_count"][g]
            names = list(shapes)
            part, padding, frags = zero1_rank([numel(tuple(s)) for s in shapes.values()], ndp, d)
            real = osd["param_slice_mappings"][g]
            want = OrderedDict((names[i], (n, s)) for i, n, s in frags)
            got = OrderedDict((k, (v.numel, v.start)) for k, v in real.items())
            exp_avg = osd["base_optimizer_state"]["state"][g]["exp_avg"]
            fp32 = osd["single_partition_of_fp32_groups"][g]
            if (got != want or osd["group_paddings"][g] != padding or exp_avg.shape != (part,)
                    or fp32.shape != (part - padding,)):
                problems.append(f"arithmetic differs from {optim} group {g}")
            checked += 1
    if checked < 20:
        problems.append(f"only {checked} real optimizer groups checked")
    print(f"verify: ZeRO-1/2 arithmetic checked against {checked} real optimizer groups of the 0.19.8 fixtures")
    # 2. generated key trees equal the real md3d fixture's (same DeepSpeed version, same model family); a rank that
    # holds only padding (possible at large dp) has an empty param_slice_mappings, as in DeepSpeed, so compare a
    # middle rank
    tag = out / TAG
    pairs = [(tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt", MD3D / "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
             (tag / f"zero_pp_rank_{dp // 2}_mp_rank_{pp * tp - 1:02d}_optim_states.pt",
              MD3D / "zero_pp_rank_0_mp_rank_03_optim_states.pt"),
             (tag / "mp_rank_00_model_states.pt", MD3D / "mp_rank_00_model_states.pt"),
             (tag / "layer_00-model_00-model_states.pt", MD3D / "layer_00-model_00-model_states.pt")]
    for mine, real in pairs:
        a, b = load_torch_metadata(str(mine)), load_torch_metadata(str(real))
        if signature(a.obj) != signature(b.obj):
            problems.append(f"key tree of {mine.name} differs from the real {real}")
        if a.report.unknown_globals != b.report.unknown_globals:
            problems.append(f"{mine.name} names other globals than {real}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--dp", type=int, default=256)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--verify", action="store_true", help="check the result against the real fixtures")
    args = ap.parse_args(argv)
    if args.hidden % 2 or min(args.dp, args.tp, args.pp, args.layers) < 1 or (4 * args.hidden) % args.tp:
        ap.error("need dp, tp, pp, layers >= 1, an even hidden size and 4*hidden divisible by tp")
    if args.out.exists() and any(args.out.iterdir()):
        ap.error(f"{args.out} exists and is not empty")
    t0 = time.perf_counter()
    info = write_checkpoint(args.out, args.dp, args.tp, args.pp, args.layers, args.hidden, args.seed)
    size = sum(f.stat().st_size for f in (args.out / TAG).iterdir())
    print(f"wrote {info['files']} files ({size / 1e6:.1f} MB) to {args.out / TAG} in {time.perf_counter() - t0:.1f}s;"
          f" pipeline stage boundaries {info['stage_bounds']}")
    if args.verify:
        problems = verify(args.out, args.dp, args.tp, args.pp)
        for p in problems:
            print("VERIFY:", p)
        print("verify:", "OK" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
