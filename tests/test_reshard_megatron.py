"""Reshard of Megatron-LM legacy checkpoints (real trees deepspeed_to_megatron.py wrote): tp2/pp2 -> tp1/pp1 -> back.

For the SwiGLU case the peer's tp1_pp1 tree is wrong (naive [gate; up] concatenation), so there the tp1 output is
compared with the fixture's universal fp32 reference, as tests/test_reader_megatron.py does.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch

from app.cli import main
from engine import discover, read_checkpoint
from engine.errors import PlanError
from engine.execute import execute_plan
from engine.plan import Target, plan_conversion
from engine.plan_reshard import flat_module
from engine.rules import strip_vocab
from engine.safe_unpickle import load_torch_metadata
from engine.tensor_io import read_tensor
from tests.fixture_paths import FIXTURES

MDS = os.path.join(FIXTURES, "megatron-deepspeed")
LAYER = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.(.*)$")


def expected(case: str, tp: int, pp: int) -> str:
    return os.path.join(MDS, case, "expected", f"megatron_tp{tp}_pp{pp}")


def latest(root: str):
    run = discover(root)[0]
    return read_checkpoint(next((i for i in run.iterations if i.latest), run.iterations[-1]))


def tree(root: str) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            if f.endswith(".pt"):
                obj = load_torch_metadata(os.path.join(d, f)).obj
                out[os.path.relpath(os.path.join(d, f), root)] = (
                    obj, {k: read_tensor(v) for k, v in flat_module(obj["model"]).items()})
    return out


def assert_same_tree(got: str, want: str) -> int:
    a, b = tree(got), tree(want)
    assert sorted(a) == sorted(b)
    n = 0
    for f, (obj, tensors) in b.items():
        mine = a[f][1]
        assert list(mine) == list(tensors), f
        for k, t in tensors.items():
            assert mine[k].dtype == t.dtype and torch.equal(mine[k], t), (f, k)
            n += 1
        assert a[f][0]["checkpoint_version"] == obj["checkpoint_version"]
        assert a[f][0]["iteration"] == obj["iteration"]
    return n


@pytest.mark.parametrize("case", ["gpt_pipe_tp2_pp2_dp1_bf16", "gpt_pipe_tp2_pp2_dp1_fp32"])
def test_tp2_pp2_to_tp1_pp1_and_back(tmp_path, case: str) -> None:
    src = latest(expected(case, 2, 2))
    execute_plan(plan_conversion(src, Target(kind="reshard", tp=1, pp=1)), str(tmp_path / "one"), workers=1)
    assert assert_same_tree(str(tmp_path / "one"), expected(case, 1, 1)) == 53  # 52 + tied word_embeddings_for_head
    assert (tmp_path / "one" / "latest_checkpointed_iteration.txt").read_text() == "10"
    one = latest(str(tmp_path / "one"))
    assert (one.degrees.tp, one.degrees.pp) == (1, 1) and not one.warnings
    obj = load_torch_metadata(str(tmp_path / "one" / "iter_0000010" / "mp_rank_00" / "model_optim_rng.pt")).obj
    args = obj["args"]
    assert (args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.world_size) == (1, 1, 1)
    assert args.transformer_pipeline_model_parallel_size == 1
    plan = plan_conversion(one, Target(kind="reshard", tp=2, pp=2))
    execute_plan(plan, str(tmp_path / "two"), workers=2)
    assert assert_same_tree(str(tmp_path / "two"), expected(case, 2, 2)) == 2 * (12 * 4 + 2 + 3)
    assert sorted(i.name for i in plan.items) == [f"mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt"
                                                  for t in range(2) for p in range(2)]


def test_swiglu_against_the_reference(tmp_path) -> None:
    case = "gpt_pipe_tp2_pp2_dp1_bf16_swiglu"
    src = latest(expected(case, 2, 2))
    execute_plan(plan_conversion(src, Target(kind="reshard", tp=1, pp=1)), str(tmp_path / "one"), workers=1)
    ((_, got),) = tree(str(tmp_path / "one")).values()
    ref = {k: read_tensor(v) for k, v in load_torch_metadata(os.path.join(MDS, case, "reference_fp32.pt")).obj.items()}
    true_vocab = json.load(open(os.path.join(MDS, case, "expected.json")))["original_vocab_size"]
    ((_, peer),) = tree(expected(case, 1, 1)).values()
    checked = fixed = 0
    for name, t in got.items():
        m = LAYER.match(name)
        if m:
            want = ref[f"{int(m.group(1)) + 2}.{m.group(2)}"].to(t.dtype)
        elif name.endswith("word_embeddings.weight") or name.startswith("word_embeddings_for_head"):
            t, want = strip_vocab(t, true_vocab), ref["tied_modules.embed.word_embeddings.weight"].to(t.dtype)
        else:
            continue
        assert torch.equal(t, want), name
        checked += 1
        if m and m.group(2).startswith("mlp.dense_h_to_4h."):
            assert not torch.equal(got[name], peer[name])  # the peer's naive concatenation
            fixed += 1
    assert checked == 4 * 12 + 2 and fixed == 8
    execute_plan(plan_conversion(latest(str(tmp_path / "one")), Target(kind="reshard", tp=2, pp=2)),
                 str(tmp_path / "two"), workers=1)
    assert assert_same_tree(str(tmp_path / "two"), expected(case, 2, 2)) > 0


def test_pp1_to_pp4_stage_assignment(tmp_path) -> None:
    """Embeddings on stage 0, one layer per middle stage, final norm and the tied head on the last stage."""
    case = "gpt_pipe_tp2_pp2_dp1_bf16"
    src = latest(expected(case, 1, 1))
    plan = plan_conversion(src, Target(kind="reshard", tp=1, pp=4))
    stages = {it.args["stage"]: [e["name"] for e in it.args["tensors"]] for it in plan.items}
    assert stages[0][0].endswith("word_embeddings.weight") and "word_embeddings_for_head.weight" in stages[3]
    assert all(n.startswith("language_model.encoder.layers.") for n in stages[1] + stages[2])
    execute_plan(plan, str(tmp_path / "four"), workers=1)
    four = latest(str(tmp_path / "four"))
    assert (four.degrees.tp, four.degrees.pp) == (1, 4) and not four.warnings
    assert {p.name: p.shape for p in four.params} == {p.name: p.shape for p in src.params}


def test_dry_run_and_refusals(tmp_path, capsys) -> None:
    src_dir = expected("gpt_pipe_tp2_pp2_dp1_bf16", 2, 2)
    assert main(["reshard", src_dir, str(tmp_path / "x"), "--tp", "1", "--pp", "1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "mp_rank_00/model_optim_rng.pt" in text and "qkv v3" in text and "512×64" in text
    assert not (tmp_path / "x").exists()
    src = latest(src_dir)
    with pytest.raises(PlanError, match="divide"):
        plan_conversion(src, Target(kind="reshard", tp=1, pp=3))
    with pytest.raises(PlanError, match="DeepSpeed layouts only"):
        plan_conversion(src, Target(kind="reshard", tp=1, pp=1, quantize="int8"))
