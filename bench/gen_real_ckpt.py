"""Write a REAL DeepSpeed checkpoint for the benchmark: a Linear stack, ZeRO-2, 1 AdamW step, engine.save_checkpoint.

Runs only in a DeepSpeed environment (see .ci/install_deepspeed.sh), launched by torchrun on gloo/CPU:
  DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 bench/gen_real_ckpt.py --hidden 4096 --layers 3 --out /tmp/bench/ck1g
Model: layers x (Linear(h, h) + ReLU) -> LayerNorm(h) -> Linear(h, h, bias=False), the same stack as the fixtures.
Size: params = layers*(h*h+h) + 2h + h*h; a bf16 ZeRO-2 checkpoint holds about 14 bytes per param
(fp32 master + exp_avg + exp_avg_sq, split over the ranks, plus the bf16 module weights).
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--zero-stage", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--bucket", type=float, default=5e7, help="ZeRO bucket sizes in elements (DeepSpeed default 5e8)")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--local_rank", type=int, default=-1)
    return p.parse_args(argv)


def build_model(hidden: int, layers: int, seed: int):  # noqa: ANN201 - torch imported lazily
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

    torch.manual_seed(seed)
    return Stack()


def ds_config(a: argparse.Namespace) -> dict:
    b = int(a.bucket)
    zero: dict = {"stage": a.zero_stage, "reduce_bucket_size": b, "allgather_bucket_size": b}
    if a.zero_stage == 3:
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": b,
                     "stage3_max_live_parameters": b, "stage3_max_reuse_distance": b})
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "steps_per_print": 1000,
           "gradient_clipping": 1.0, "zero_optimization": zero,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01, "torch_adam": True}}}
    if a.dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def main() -> None:
    a = parse()
    import importlib

    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.checkpoint import UNIVERSAL_CHECKPOINT_VERSION_KEY, UNIVERSAL_CHECKPOINT_VERSION_VALUE

    # skip the optional shared-memory all-reduce op (a 60-90 s JIT build on first use; gloo does the work without it)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    t0 = time.time()
    model = build_model(a.hidden, a.layers, a.seed)
    n_params = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(a))
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    g = torch.Generator().manual_seed(a.seed + 1000 * rank)
    t1 = time.time()
    for _ in range(a.steps):
        y = engine(torch.randn(2, a.hidden, generator=g).to(engine.device, dtype))
        loss = (y.float() ** 2).mean()
        engine.backward(loss)
        engine.step()
    t2 = time.time()
    client_state = {"universal_checkpoint_info": {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(a.out, client_state=client_state)
    t3 = time.time()
    if rank == 0:
        info = {"generator": "bench/gen_real_ckpt.py", "deepspeed": deepspeed.__version__, "torch": torch.__version__,
                "world": world, "params": n_params, "hidden": a.hidden, "layers": a.layers,
                "zero_stage": a.zero_stage, "dtype": a.dtype, "init_s": round(t1 - t0, 2),
                "train_s": round(t2 - t1, 2), "save_s": round(t3 - t2, 2)}
        with open(os.path.join(a.out, "gen_info.json"), "w", encoding="utf-8") as fh:
            json.dump(info, fh, indent=1)
        print("GEN_RESULT " + json.dumps(info), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
