"""Reshard of non-pipeline (Megatron-)DeepSpeed checkpoints (`module` in mp_rank files): SDLoader fixtures, gpt_nopipe.

Every sdloader version and merge/split case is resharded through the planner and executor and compared with the
native `tp{dst}` checkpoint (the ground truth) and with DeepSpeed's MegatronSDLoader output where SUMMARY.md says it
is right (the oracle helpers of tests/test_sdloader_parity.py).
"""

from __future__ import annotations

import os

import pytest
import torch

from app.cli import main
from engine import discover, read_checkpoint
from engine.errors import PlanError
from engine.execute import execute_plan
from engine.plan import Target, plan_conversion
from engine.plan_reshard import flat_module
from engine.safe_unpickle import load_torch_metadata
from engine.tensor_io import read_tensor
from tests.fixture_paths import FIXTURES
from tests.test_sdloader_parity import VERSIONS, oracle, sdloader_status

SDL = os.path.join(FIXTURES, "sdloader")
NOPIPE = os.path.join(FIXTURES, "megatron-deepspeed", "gpt_nopipe_tp2_pp1_dp2_bf16", "ckpt")
MOVES = [(4, 2), (4, 1), (2, 1), (1, 2), (1, 4), (2, 4)]
_DONE: dict[tuple, str] = {}


def latest(root: str):
    run = discover(root)[0]
    return read_checkpoint(next((i for i in run.iterations if i.latest), run.iterations[-1]))


def reshard(root: str, out: str, tp: int, quantize: str | None = None, workers: int = 1) -> str:
    ckpt = latest(root)
    execute_plan(plan_conversion(ckpt, Target(kind="reshard", tp=tp, pp=1, quantize=quantize)), out,
                 workers=workers)
    return os.path.join(out, ckpt.tag)


def sdl_output(tmp_root, version: str, src: int, dst: int, quantize: str | None = None) -> str:
    key = (version, src, dst, quantize)
    if key not in _DONE:
        out = os.path.join(str(tmp_root), f"{version}_{src}to{dst}_{quantize}")
        _DONE[key] = reshard(os.path.join(SDL, version, f"tp{src}"), out, dst, quantize)
    return _DONE[key]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("reshard_module")


def rank_file(tag_dir: str, r: int) -> dict:
    return load_torch_metadata(os.path.join(tag_dir, f"mp_rank_{r:02d}_model_states.pt")).obj


def tensors(module: dict) -> dict[str, torch.Tensor]:
    return {k: read_tensor(v) for k, v in flat_module(module).items()}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("src,dst", MOVES)
def test_sdloader_cases(tmp_root, version: str, src: int, dst: int) -> None:
    tag_dir = sdl_output(tmp_root, version, src, dst)
    assert sorted(os.listdir(tag_dir)) == [f"mp_rank_{r:02d}_model_states.pt" for r in range(dst)]
    status, wrong = sdloader_status(version, src, dst, False)
    for r in range(dst):
        ours = rank_file(tag_dir, r)
        truth = load_torch_metadata(os.path.join(SDL, version, f"tp{dst}", "global_step10",
                                                 f"mp_rank_{r:02d}_model_states.pt")).obj
        mine, native = tensors(ours["module"]), tensors(truth["module"])
        assert list(mine) == list(native)
        for k, t in native.items():
            assert mine[k].dtype == t.dtype and torch.equal(mine[k], t), (r, k)
        # metadata: the native tp{dst} file's, key for key (degrees, args, param_shapes recomputed)
        assert list(ours) == list(truth)
        assert ours["mp_world_size"] == dst and ours["checkpoint_parallel_dimensions"]["tp_degree"] == dst
        assert ours["args"].tensor_model_parallel_size == dst and ours["optimizer"] is None
        for k in truth:
            if k != "module":
                assert repr(ours[k]) == repr(truth[k]), k
        if status == "error":
            continue
        theirs = oracle(version, f"{src}to{dst}_q0", r)["sd"]["module"]
        assert list(theirs) == list(mine)
        assert {n for n in theirs if not torch.equal(theirs[n], mine[n])} == wrong


@pytest.mark.parametrize("version", VERSIONS)
def test_split_then_merge_is_bit_identical(tmp_root, version: str) -> None:
    four = sdl_output(tmp_root, version, 1, 4)
    back = reshard(os.path.dirname(four), os.path.join(str(tmp_root), f"{version}_back"), 1)
    a = tensors(rank_file(back, 0)["module"])
    b = tensors(load_torch_metadata(os.path.join(SDL, version, "tp1", "global_step10",
                                                 "mp_rank_00_model_states.pt")).obj["module"])
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in b)


def test_gpt_nopipe_round_trip(tmp_path) -> None:
    src = latest(NOPIPE)
    one = reshard(NOPIPE, str(tmp_path / "one"), 1)
    assert os.listdir(one) == ["mp_rank_00_model_states.pt"]  # no ZeRO optimizer files
    mp0 = rank_file(one, 0)
    assert mp0["optimizer"] is None and mp0["mp_world_size"] == 1
    assert mp0["checkpoint_parallel_dimensions"] == {"pp_degree": 1, "tp_degree": 1}
    assert mp0["args"].tensor_model_parallel_size == 1 and mp0["args"].padded_vocab_size == 512
    assert mp0["checkpoint_version"] == 3.0 and mp0["iteration"] == src.iteration
    assert isinstance(mp0["module"]["language_model"]["encoder"], dict)  # Megatron's nesting kept
    shapes = {n: tuple(s) for g in mp0["param_shapes"] for n, s in g.items()}
    assert shapes == {p.name: tuple(p.padded_shape or p.shape) for p in src.params}
    ref = torch.load(os.path.join(os.path.dirname(NOPIPE), "reference_fp32.pt"), weights_only=True)
    flat = tensors(mp0["module"])
    assert set(flat) == set(ref)
    for k, v in ref.items():  # the bf16 weights are the fp32 masters rounded; vocabulary padding beyond 507 rows
        assert torch.allclose(flat[k][: v.shape[0]].float(), v, atol=0, rtol=1e-2), k
    back = latest(os.path.dirname(one))
    assert (back.degrees.tp, back.degrees.pp) == (1, 1)
    two = reshard(os.path.dirname(one), str(tmp_path / "two"), 2, workers=2)
    n = 0
    for r in range(2):
        a = tensors(load_torch_metadata(os.path.join(src.path, f"mp_rank_{r:02d}_model_states.pt")).obj["module"])
        b = tensors(rank_file(two, r)["module"])
        assert list(a) == list(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), (r, k)
            n += 1
    assert n == 2 * 52


def test_dry_run_and_refusals(tmp_path, capsys) -> None:
    dst = tmp_path / "dst"
    assert main(["reshard", NOPIPE, str(dst), "--tp", "1", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert not dst.exists()
    assert "mp_rank_00_model_states.pt" in text and "qkv v3" in text and "column (dim 0) +vocab" in text
    assert "512×64" in text and "optimizer state is not resharded" in text
    src = latest(NOPIPE)
    with pytest.raises(PlanError, match="pp=1 only"):
        plan_conversion(src, Target(kind="reshard", tp=1, pp=2))
    with pytest.raises(PlanError, match="divide"):
        plan_conversion(src, Target(kind="reshard", tp=3, pp=1))
    with pytest.raises(PlanError, match="heads"):
        plan_conversion(latest(os.path.join(SDL, "v2.0", "tp1")), Target(kind="reshard", tp=8, pp=1))
