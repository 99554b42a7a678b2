"""Reshard of Megatron-DeepSpeed pipeline checkpoints (model weights): real fixtures, tp2/pp2 -> tp1/pp1 -> tp2/pp2."""

from __future__ import annotations

import os

import pytest
import torch

from app.cli import main
from engine import discover, read_checkpoint
from engine.assemble import assemble_state
from engine.execute import execute_plan
from engine.formats.deepspeed import param_spec
from engine.plan import Target, plan_conversion
from engine.plan_reshard import _layer_param_name
from engine.safe_unpickle import load_torch_metadata
from engine.tensor_io import read_tensor
from tests.fixture_paths import FIXTURES

MDS = os.path.join(FIXTURES, "megatron-deepspeed")
CASES = ["gpt_pipe_tp2_pp2_dp1_bf16", "gpt_pipe_tp2_pp2_dp1_bf16_swiglu"]
MD3D = os.path.join(FIXTURES, "deepspeed-0.19.8", "md3d_pp2_tp2_fp32_ws4", "ckpt")


def _latest(root: str):
    run = discover(root)[0]
    ref = next((i for i in run.iterations if i.latest), run.iterations[-1])
    return read_checkpoint(ref)


def _load(path: str) -> dict:
    obj = load_torch_metadata(path).obj
    return {k: read_tensor(v) for k, v in obj.items()}


def _check_against_source(src, out_dir: str) -> int:
    """Every tensor of every tp=1 layer file equals the global tensor assembled from the source (padding kept)."""
    from dataclasses import replace

    names = {p.name for p in src.params}
    checked = 0
    for f in os.listdir(out_dir):
        if not f.startswith("layer_"):
            continue
        layer = int(f.split("_")[1].split("-")[0])
        for key, tensor in _load(os.path.join(out_dir, f)).items():
            name = _layer_param_name(names, layer, key)
            spec = replace(param_spec(src, name), vocab=False)
            expected = assemble_state(src.param(name), spec, "weight")
            assert torch.equal(tensor, expected), name
            checked += 1
    return checked


@pytest.mark.parametrize("case", CASES)
def test_reshard_to_tp1_and_back(case: str, tmp_path) -> None:
    root = os.path.join(MDS, case, "ckpt")
    src = _latest(root)
    one = tmp_path / "tp1"
    execute_plan(plan_conversion(src, Target(kind="reshard", tp=1, pp=1)), str(one), workers=1)
    out_dir = one / src.tag
    assert sorted(os.listdir(out_dir)) == sorted(
        [f"layer_{i:02d}-model_00-model_states.pt" for i in range(1, 7)] + ["mp_rank_00_model_states.pt"])
    assert _check_against_source(src, str(out_dir)) == len(src.params)
    assert (one / "latest").read_text() == src.tag
    back = _latest(str(one))
    assert (back.degrees.tp, back.degrees.pp) == (1, 1)
    mp0 = load_torch_metadata(str(out_dir / "mp_rank_00_model_states.pt")).obj
    assert mp0["checkpoint_parallel_dimensions"] == {"pp_degree": 1, "tp_degree": 1}
    assert mp0["mp_world_size"] == 1 and mp0["iteration"] == src.iteration
    assert mp0["args"].tensor_model_parallel_size == 1 and mp0["args"].pipeline_model_parallel_size == 1
    shapes = {n: tuple(s) for g in mp0["param_shapes"] for n, s in g.items()}
    assert shapes == {p.name: (p.padded_shape or p.shape) for p in src.params}
    assert {p.name: p.shape for p in back.params} == {p.name: p.shape for p in src.params}
    # back to tp 2 / pp 2: every layer file bit for bit equal to the original
    plan = plan_conversion(back, Target(kind="reshard", tp=2, pp=2))
    two = tmp_path / "tp2"
    execute_plan(plan, str(two), workers=2)
    again = _latest(str(two))
    assert (again.degrees.tp, again.degrees.pp) == (2, 2)
    assert {p.name: p.shape for p in again.params} == {p.name: p.shape for p in src.params}
    n = 0
    for f in sorted(os.listdir(src.path)):
        if f.startswith("layer_"):
            a, b = _load(os.path.join(src.path, f)), _load(str(two / src.tag / f))
            assert list(a) == list(b), f
            for k in a:
                assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (f, k)
                n += 1
    assert n > 0
    stages = {it.args["layer"]: it.args["stage"] for it in plan.items if it.kind == "reshard_layer"}
    assert stages == {1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}


def test_md3d_to_tp1(tmp_path) -> None:
    src = _latest(MD3D)
    out = tmp_path / "o"
    execute_plan(plan_conversion(src, Target(kind="reshard", tp=1, pp=1)), str(out), workers=1)
    assert _check_against_source(src, str(out / src.tag)) == len(src.params)


def test_dry_run_writes_nothing(tmp_path, capsys) -> None:
    src = os.path.join(MDS, CASES[0], "ckpt")
    dst = tmp_path / "dst"
    assert main(["reshard", src, str(dst), "--tp", "1", "--pp", "1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not dst.exists()
    assert "column (dim 0) +vocab" in text and "512×64" in text and "256×64" in text
    assert "layer_05-model_00-model_states.pt" in text and "optimizer state is not resharded" in text


def test_refusals() -> None:
    from engine.errors import PlanError

    src = _latest(os.path.join(MDS, CASES[0], "ckpt"))
    with pytest.raises(PlanError, match="int8 only"):
        plan_conversion(src, Target(kind="reshard", tp=1, pp=1, quantize="fp4"))
    with pytest.raises(PlanError, match="divide"):
        plan_conversion(src, Target(kind="reshard", tp=3, pp=1))
    with pytest.raises(PlanError, match="pipeline stages"):
        plan_conversion(src, Target(kind="reshard", tp=1, pp=8))
