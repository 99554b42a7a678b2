"""Load a universal checkpoint with REAL DeepSpeed (torchrun, gloo, CPU) and dump what it restored to one file.

Run in a DeepSpeed environment, one process per rank:
  DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node N tests/interop/load_universal.py \
      --load-dir OUT --zero-stage 2 --dtype fp32 --hidden 64 --layers 4 --dump dump.pt
The model is the fixtures' generator model: layers x (Linear(h, h) + ReLU) -> LayerNorm(h) -> Linear(h, h, bias=False).
The dump (written by rank 0 with torch.save) is {"fp32": {name: T}, "exp_avg": {...}, "exp_avg_sq": {...},
"lp": {name: module weight in the model dtype}, "steps": [optimizer step values], "global_steps": int, "world": int}.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--load-dir", required=True, help="folder holding latest_universal and <tag>_universal/")
    p.add_argument("--zero-stage", type=int, required=True, choices=[1, 2, 3])
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dump", required=True)
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args()


def build_model(hidden: int, layers: int):  # noqa: ANN201 - torch is imported lazily
    import torch
    import torch.nn as nn

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(layers)])
            self.norm = nn.LayerNorm(hidden)
            self.head = nn.Linear(hidden, hidden, bias=False)

        def forward(self, x):  # noqa: ANN001, ANN202
            for lin in self.layers:
                x = torch.relu(lin(x))
            return self.head(self.norm(x))

    torch.manual_seed(4321)  # deliberately not the generator's seed: every value must come from the checkpoint
    return Stack()


def ds_config(a: argparse.Namespace) -> dict:
    zero: dict = {"stage": a.zero_stage}
    if a.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
           "gradient_clipping": 1.0, "zero_optimization": zero, "checkpoint": {"load_universal": True},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                                        "warmup_num_steps": 10}}}
    if a.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def main() -> None:
    a = parse()
    import importlib

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    # The shared-memory all-reduce op is an optional speed-up that DeepSpeed JIT-compiles (60-90 s) on first use;
    # without it the CPU backend uses plain gloo collectives. Loading needs none of its speed.
    # (`import deepspeed.comm.torch` would give the torch package: deepspeed.comm re-exports it under that name.)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build_model(a.hidden, a.layers)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(a))
    load_path, _ = engine.load_checkpoint(a.load_dir)
    if load_path is None:
        raise SystemExit(f"DeepSpeed loaded nothing from {a.load_dir}")
    dump: dict = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}, "lp": {}, "world": world,
                  "global_steps": int(engine.global_steps)}
    for name, p in engine.module.named_parameters():  # collective under ZeRO-3: every rank walks every param
        full = safe_get_full_fp32_param(p)
        dump["fp32"][name] = None if full is None else full.detach().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            st = safe_get_full_optimizer_state(p, key)
            dump[key][name] = None if st is None else st.detach().cpu().clone()
        with deepspeed.zero.GatheredParameters([p], enabled=a.zero_stage == 3):
            dump["lp"][name] = p.detach().cpu().clone()
    base = getattr(engine.optimizer, "optimizer", None)
    steps = []
    for st in (base.state.values() if base is not None else ()):
        if "step" in st:
            steps.append(float(st["step"]))
    dump["steps"] = steps
    if rank == 0:
        torch.save(dump, a.dump)
        print(f"LOADED {load_path} world={world} params={len(dump['fp32'])} steps={steps}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
