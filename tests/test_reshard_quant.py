"""`reshard --quantize int8`: DeepSpeed's WeightQuantization oracle on the sdloader fixtures, and pipeline checkpoints.

Merges must equal DeepSpeed's int8 tensors and `all_scales` bit for bit where SUMMARY.md says it is right (v1.0,
v2.0, v3.0); splits, where DeepSpeed crashes, must dequantize within max|w|/127 of the native `tp{dst}` weights.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from app.cli import main
from engine.assemble import assemble_state
from engine.errors import PlanError
from engine.execute import execute_plan
from engine.formats.deepspeed import param_spec
from engine.plan import Target, plan_conversion
from engine.plan_reshard import _layer_param_name, flat_module
from engine.quantize import F_KEYS, F_SCALES, QUANT_ENTRY, dequantize_entry, quantize_module
from engine.rules import split
from engine.safe_unpickle import load_torch_metadata
from engine.tensor_io import read_tensor
from tests.fixture_paths import FIXTURES
from tests.test_reshard_module import SDL, latest, rank_file, sdl_output, tensors
from tests.test_sdloader_parity import oracle, sdloader_status

PIPE = os.path.join(FIXTURES, "megatron-deepspeed", "gpt_pipe_tp2_pp2_dp1_bf16", "ckpt")
MERGES = [(4, 2), (4, 1), (2, 1)]
SPLITS = [(1, 2), (1, 4), (2, 4)]


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return tmp_path_factory.mktemp("reshard_quant")


def _entry(obj: dict) -> dict:
    entry = dict(obj[QUANT_ENTRY])
    entry[F_SCALES] = read_tensor(entry[F_SCALES])
    return entry


@pytest.mark.parametrize("version", ["v1.0", "v2.0", "v3.0"])
@pytest.mark.parametrize("src,dst", MERGES)
def test_merges_equal_deepspeed(tmp_root, version: str, src: int, dst: int) -> None:
    assert sdloader_status(version, src, dst, True) == ("right", set())
    tag_dir = sdl_output(tmp_root, version, src, dst, "int8")
    for r in range(dst):
        obj = rank_file(tag_dir, r)
        ours, entry = tensors(obj["module"]), _entry(obj)
        theirs = oracle(version, f"{src}to{dst}_q1", r)
        assert list(ours) == list(theirs["sd"]["module"])
        for k, t in theirs["sd"]["module"].items():
            assert ours[k].dtype == t.dtype and torch.equal(ours[k], t), (r, k)
        assert sum(t.dtype == torch.int8 for t in ours.values()) == 8
        assert torch.equal(entry[F_SCALES], theirs["all_scales"])
        assert entry["merge_count"] == src // dst and entry["mp_size"] == dst
        assert set(entry["errors"]) == {k["name"] for k in entry[F_KEYS]}


@pytest.mark.parametrize("version", ["v0", "v1.0", "v2.0", "v2.0_final_linear", "v3.0"])
@pytest.mark.parametrize("src,dst", SPLITS + [(4, 2)])
def test_dequantized_within_bound_of_truth(tmp_root, version: str, src: int, dst: int) -> None:
    """Splits (DeepSpeed crashes) and the v0 merge (DeepSpeed regroups wrongly) against the native weights."""
    tag_dir = sdl_output(tmp_root, version, src, dst, "int8")
    for r in range(dst):
        obj = rank_file(tag_dir, r)
        ours, entry = tensors(obj["module"]), _entry(obj)
        truth = tensors(load_torch_metadata(os.path.join(SDL, version, f"tp{dst}", "global_step10",
                                                         f"mp_rank_{r:02d}_model_states.pt")).obj["module"])
        qnames = {k["name"] for k in entry[F_KEYS]}
        assert len(qnames) == 8
        for name, t in truth.items():
            if name not in qnames:
                assert torch.equal(ours[name], t), name
                continue
            diff = (dequantize_entry(entry, name, ours[name]) - t.float()).abs()
            bound = float(t.float().abs().max()) / 127
            assert float(diff.max()) <= bound, (name, float(diff.max()), bound)
            rec = entry["errors"][name]
            assert rec["max"] == pytest.approx(float(diff.max())) and rec["bound"] == pytest.approx(bound)
        if (src, dst) in SPLITS:  # equals DeepSpeed quantizing the native tp{dst} files
            ident = oracle(version, f"{dst}to{dst}_q1", r)
            assert all(torch.equal(ours[n], ident["sd"]["module"][n]) for n in ours)
            assert torch.equal(entry[F_SCALES], ident["all_scales"])


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_pipeline_int8(tmp_path, tp: int, pp: int) -> None:
    src = latest(PIPE)
    out = tmp_path / "q"
    execute_plan(plan_conversion(src, Target(kind="reshard", tp=tp, pp=pp, quantize="int8")), str(out), workers=2)
    tag_dir = out / src.tag
    names = {p.name for p in src.params}
    per_rank: dict[int, dict] = {}
    for f in sorted(os.listdir(tag_dir)):
        if not f.startswith("layer_"):
            continue
        layer, t = int(f.split("_")[1].split("-")[0]), int(f.split("_")[2].split("-")[0])
        for key, ref in load_torch_metadata(str(tag_dir / f)).obj.items():
            name = _layer_param_name(names, layer, key)
            spec = replace(param_spec(src, name), vocab=False)
            full = assemble_state(src.param(name), spec, "weight")
            per_rank.setdefault(t, {})[name] = (read_tensor(ref), split(spec, full, tp)[t])
    checked = 0
    for mp in range(tp * pp):
        entry = _entry(rank_file(str(tag_dir), mp))
        stage_names = [k["name"] for k in entry[F_KEYS]]
        assert len(stage_names) == 4 * 4 // pp  # four weights per transformer layer of the stage
        expected_q, expected_entry = quantize_module({n: per_rank[mp % tp][n][1] for n in stage_names}, mp_size=tp,
                                                     merge_count=2 // tp)
        assert torch.equal(entry[F_SCALES], expected_entry[F_SCALES])
        for name in stage_names:
            q, ground = per_rank[mp % tp][name]
            assert q.dtype == torch.int8 and torch.equal(q, expected_q[name]), name
            diff = (dequantize_entry(entry, name, q) - ground.float()).abs()
            assert float(diff.max()) <= float(ground.float().abs().max()) / 127
            checked += 1
    assert checked == 16 * tp
    assert sum(t.dtype == torch.int8 for r in per_rank.values() for t, _ in r.values()) == 16 * tp


def test_cli_prints_error_table(tmp_path, capsys) -> None:
    src = os.path.join(SDL, "v2.0", "tp2")
    assert main(["reshard", src, str(tmp_path / "o"), "--tp", "1", "--quantize", "int8", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "int8 dequantization error (8 weights" in text and "layers.1.mlp.dense_4h_to_h.weight" in text
    assert "worst:" in text
    flat = flat_module(rank_file(str(tmp_path / "o" / "global_step10"), 0)["module"])
    assert sum(v.dtype == "int8" for v in flat.values()) == 8


def test_quantize_options_reach_the_entry(tmp_path) -> None:
    src = latest(os.path.join(SDL, "v1.0", "tp2"))
    plan = plan_conversion(src, Target(kind="reshard", tp=1, pp=1, quantize="int8", groups=32,
                                       mlp_extra_grouping=False))
    execute_plan(plan, str(tmp_path / "o"), workers=1)
    entry = _entry(rank_file(str(tmp_path / "o" / src.tag), 0))
    assert entry["groups"] == 32 and entry["mlp_extra_grouping"] is False
    assert {k["groups"] for k in entry[F_KEYS]} == {32}
    with pytest.raises(PlanError, match="int8 only"):
        plan_conversion(src, Target(kind="reshard", tp=1, pp=1, quantize="int4"))
