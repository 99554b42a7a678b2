"""Consolidated safetensors/torch export equals zero_to_fp32 where it ran, and reference_fp32.pt everywhere
(pipeline, tensor-parallel, ZeRO-0 and BF16_Optimizer checkpoints too, which zero_to_fp32 refuses)."""

from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from fixture_paths import FIXTURES, reference_cases
from safetensors.torch import load_file

import engine
from engine.execute import execute_plan
from engine.plan import Target, plan_conversion


def _ckpt(case: str):
    run = [r for r in engine.discover(os.path.join(FIXTURES, case, "ckpt")) if r.root.endswith("ckpt")][0]
    return engine.read_checkpoint(engine.pick_iteration(run))


@pytest.mark.parametrize("case", reference_cases())
def test_safetensors_equals_reference(case: str, tmp_path) -> None:
    out = tmp_path / "out"
    execute_plan(plan_conversion(_ckpt(case), Target("safetensors", max_shard_size=60_000)), str(out), workers=1)
    got: dict = {}
    for f in glob.glob(str(out / "*.safetensors")):
        got.update(load_file(f))
    ref = torch.load(os.path.join(FIXTURES, case, "reference_fp32.pt"), weights_only=False)
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert torch.equal(got[k], v.float()), k
    z2f = os.path.join(FIXTURES, case, "expected", "fp32", "pytorch_model.bin")
    if os.path.exists(z2f):
        for k, v in torch.load(z2f, weights_only=False).items():
            assert torch.equal(got[k], v.float()), k
    if len(glob.glob(str(out / "*.safetensors"))) > 1:
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(ref)
        assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in ref.values())


def test_torch_bf16_and_vocab_stripped(tmp_path) -> None:
    case = "megatron-deepspeed/gpt_pipe_tp2_pp2_dp1_bf16"
    out = tmp_path / "out"
    execute_plan(plan_conversion(_ckpt(case), Target("torch", dtype="bfloat16")), str(out), workers=2)
    sd = torch.load(out / "pytorch_model.bin", weights_only=True)
    ref = torch.load(os.path.join(FIXTURES, case, "reference_fp32.pt"), weights_only=False)
    assert sd["tied_modules.embed.word_embeddings.weight"].shape == (507, 64)
    for k, v in ref.items():
        assert sd[k].dtype == torch.bfloat16
        assert torch.equal(sd[k], v.to(torch.bfloat16)), k
