"""Megatron-LM legacy reader on the real trees Megatron-DeepSpeed's deepspeed_to_megatron.py wrote.

The `expected/megatron_tp{1,2}_pp{1,2}` trees are real Megatron-LM legacy layouts. Merging the tp2_pp2 tree
with our rules must give the tp1_pp1 tree bit for bit, except for the SwiGLU case: there the peer tool
concatenates the fused [gate; up] halves naively (its tp1 file is wrong, see the fixture README), and our merge
must instead equal the DeepSpeed source checkpoint and the universal fp32 reference.
Expert-parallel, virtual-pipeline and Megatron-Core-name checkpoints are written synthetically with torch.save
at the end (no real Megatron-LM run of those shapes exists among the fixtures).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil

import pytest
import torch

from engine.discover import discover, pick_iteration, read_checkpoint
from engine.errors import CheckpointError
from engine.formats.megatron_legacy import spec_for
from engine.layout import Checkpoint, Format, Param
from engine.rules import TpRule, classify_deepspeed, merge, strip_vocab
from engine.safe_unpickle import load_torch_metadata
from engine.tensor_io import forget_files, read_tensor

MDS = os.path.join(os.path.dirname(__file__), "fixtures", "megatron-deepspeed")
CASES = ("gpt_pipe_tp2_pp2_dp1_bf16", "gpt_pipe_tp2_pp2_dp1_fp32", "gpt_pipe_tp2_pp2_dp1_bf16_swiglu")
LAYER = re.compile(r"^language_model\.encoder\.layers\.(\d+)\.(.*)$")


def _read(root: str) -> Checkpoint:
    runs = discover(root)
    assert [r.format for r in runs] == [Format.MEGATRON]
    return read_checkpoint(pick_iteration(runs[0]))


def _tree(case: str, tp: int, pp: int) -> Checkpoint:
    return _read(os.path.join(MDS, case, "expected", f"megatron_tp{tp}_pp{pp}"))


def _merged(ckpt: Checkpoint, p: Param) -> torch.Tensor:
    slices = [read_tensor(f.tensor) for f in sorted(p.fragments, key=lambda f: f.tp)]
    return merge(spec_for(ckpt, p.name), slices)


def test_discovery_finds_exactly_the_legacy_trees() -> None:
    runs = [r for r in discover(MDS) if r.format == Format.MEGATRON]
    roots = sorted(os.path.relpath(r.root, MDS) for r in runs)
    assert roots == sorted(os.path.join(c, "expected", f"megatron_tp{t}_pp{t}") for c in CASES for t in (1, 2))
    for run in runs:
        assert [(i.tag, i.iteration, i.latest) for i in run.iterations] == [("iter_0000010", 10, True)]
        assert run.latest_tag == "iter_0000010"


@pytest.mark.parametrize("case", CASES)
def test_degrees_files_and_shapes(case: str) -> None:
    one, two = _tree(case, 1, 1), _tree(case, 2, 2)
    expected = json.load(open(os.path.join(MDS, case, "expected.json")))
    assert (one.degrees.tp, one.degrees.pp, two.degrees.tp, two.degrees.pp) == (1, 1, 2, 2)
    assert one.warnings == () and two.warnings == ()
    assert one.dtype == two.dtype == {"bf16": "bfloat16", "fp32": "float32"}[expected["dtype"]]
    assert one.iteration == two.iteration == expected["iteration"]
    assert len(one.files) == 1 and len(two.files) == 4 and {f.role for f in two.files} == {"model_optim_rng"}
    assert {(f.tp, f.pp) for f in two.files} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert [p.name for p in one.params] == [p.name for p in two.params]
    for a, b in zip(one.params, two.params, strict=True):
        assert (a.shape, a.rule, a.tied_to, a.padded_shape) == (b.shape, b.rule, b.tied_to, b.padded_shape), a.name
    # every shape equals what expected.json records for the DeepSpeed source (vocabulary: padded here,
    # because a Megatron legacy checkpoint records only args.padded_vocab_size)
    shapes = {p.name: p.shape for p in two.params}
    for ds_name, shape in expected["params"].items():
        m = re.match(r"^(\d+)\.(.*)$", ds_name)
        if ds_name == "tied_modules.embed.word_embeddings.weight":
            name, shape = "language_model.embedding.word_embeddings.weight", [expected["padded_vocab_size"], shape[1]]
        elif ds_name == "tied_modules.embed.position_embeddings.weight":
            name = "language_model.embedding.position_embeddings.weight"
        elif m and m.group(2) in ("weight", "bias"):
            name = f"language_model.encoder.final_layernorm.{m.group(2)}"
        else:
            assert m, ds_name
            name = f"language_model.encoder.layers.{int(m.group(1)) - 2}.{m.group(2)}"
        assert shapes[name] == tuple(shape), name
    assert two.meta["padded_vocab_size"] == 512 and two.meta["true_vocab_size"] is None
    assert all(p.padded_shape is None for p in two.params)


def test_layer_renumbering_and_ties() -> None:
    ckpt = _tree("gpt_pipe_tp2_pp2_dp1_bf16", 2, 2)
    layers = sorted({int(m.group(1)) for p in ckpt.params if (m := LAYER.match(p.name))})
    assert layers == [0, 1, 2, 3]
    p2 = ckpt.param("language_model.encoder.layers.2.self_attention.dense.weight")
    assert {s.pp for s in p2.shards} == {1} and p2.rule == "row" and p2.partition_dim == 1
    assert all(f.tensor.file.endswith(os.path.join(f"mp_rank_{f.tp:02d}_001", "model_optim_rng.pt"))
               for f in p2.fragments)
    assert [s.shape for s in p2.shards] == [(64, 32), (64, 32)] and p2.shape == (64, 64)
    qkv = ckpt.param("language_model.encoder.layers.1.self_attention.query_key_value.weight")
    assert spec_for(ckpt, qkv.name).label == "qkv v3" and qkv.shape == (192, 64)
    head = ckpt.param("word_embeddings_for_head.weight")
    emb = ckpt.param("language_model.embedding.word_embeddings.weight")
    assert head.tied_to == emb.name and {s.pp for s in head.shards} == {1} and {s.pp for s in emb.shards} == {0}
    assert ckpt.param_bytes == sum(p.nbytes for p in ckpt.params) - head.nbytes
    assert all(not p.flags for p in ckpt.params)
    final = ckpt.param("language_model.encoder.final_layernorm.weight")
    assert final.rule == "replicated" and {s.pp for s in final.shards} == {1}


@pytest.mark.parametrize("case", ["gpt_pipe_tp2_pp2_dp1_bf16", "gpt_pipe_tp2_pp2_dp1_fp32"])
def test_merged_tp2_pp2_equals_tp1_pp1(case: str) -> None:
    one, two = _tree(case, 1, 1), _tree(case, 2, 2)
    for p in two.params:
        want = read_tensor(one.param(p.name).fragments[0].tensor)
        got = _merged(two, p)
        assert got.dtype == want.dtype and torch.equal(got, want), p.name


def _ds_layer(case: str, layer: int, tp: int, key: str) -> torch.Tensor:
    path = os.path.join(MDS, case, "ckpt", "global_step10", f"layer_{layer:02d}-model_{tp:02d}-model_states.pt")
    return read_tensor(load_torch_metadata(path).obj[key])


def test_swiglu_merge_corrects_the_peer_tool() -> None:
    case = "gpt_pipe_tp2_pp2_dp1_bf16_swiglu"
    one, two = _tree(case, 1, 1), _tree(case, 2, 2)
    ref = {k: read_tensor(v) for k, v in load_torch_metadata(os.path.join(MDS, case, "reference_fp32.pt")).obj.items()}
    uc = load_torch_metadata(os.path.join(MDS, case, "ckpt", "global_step10", "mp_rank_00_model_states.pt")).obj[
        "universal_checkpoint_info"]
    true_vocab = json.load(open(os.path.join(MDS, case, "expected.json")))["original_vocab_size"]
    fixed = 0
    for p in two.params:
        got = _merged(two, p)
        peer = read_tensor(one.param(p.name).fragments[0].tensor)
        m = LAYER.match(p.name)
        if m and m.group(2).startswith("mlp.dense_h_to_4h."):
            assert spec_for(two, p.name).rule == TpRule.SWIGLU
            assert not torch.equal(got, peer), p.name  # the peer's naive [W0;V0;W1;V1]
            ds_name = f"{int(m.group(1)) + 2}.{m.group(2)}"
            assert torch.equal(got, ref[ds_name].to(got.dtype)), p.name  # the universal fp32 weights
            ds_spec = classify_deepspeed(ds_name, uc, 2)
            src = merge(ds_spec, [_ds_layer(case, int(m.group(1)) + 2, t, m.group(2)) for t in (0, 1)])
            assert ds_spec.rule == TpRule.SWIGLU and torch.equal(got, src)  # the DeepSpeed source, merged
            fixed += 1
            continue
        assert torch.equal(got, peer), p.name
        if m:
            assert torch.equal(got, ref[f"{int(m.group(1)) + 2}.{m.group(2)}"].to(got.dtype)), p.name
        elif p.name.endswith("word_embeddings.weight"):
            assert torch.equal(strip_vocab(got, true_vocab),
                               ref["tied_modules.embed.word_embeddings.weight"].to(got.dtype))
    assert fixed == 8  # weight and bias of 4 layers


# -- errors and synthetic layouts -----------------------------------------------------------------------

def test_corrupt_and_missing_files(tmp_path) -> None:
    src = os.path.join(MDS, "gpt_pipe_tp2_pp2_dp1_bf16", "expected", "megatron_tp2_pp2")
    root = tmp_path / "run"
    shutil.copytree(src, root)
    victim = root / "iter_0000010" / "mp_rank_01_001" / "model_optim_rng.pt"
    victim.write_bytes(victim.read_bytes()[:200])
    forget_files()
    with pytest.raises(CheckpointError) as err:
        _read(str(root))
    assert str(victim) in str(err.value)
    shutil.rmtree(root / "iter_0000010" / "mp_rank_01_001")
    with pytest.raises(CheckpointError, match="missing the folder of tp rank 1, pp rank 1"):
        _read(str(root))


def _ns(**kw) -> argparse.Namespace:
    base = dict(num_layers=2, num_attention_heads=8, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                expert_model_parallel_size=1, padded_vocab_size=64, swiglu=False)
    return argparse.Namespace(**{**base, **kw})


def _write(root, dirs: dict[str, dict], tracker: str = "7") -> None:
    for name, obj in dirs.items():
        d = root / "iter_0000007" / name
        d.mkdir(parents=True)
        torch.save(obj, d / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(tracker)


def _layer(i: int, hidden: int = 16) -> dict[str, torch.Tensor]:
    return {f"decoder.layers.{i}.self_attention.linear_qkv.weight": torch.full((3 * hidden, hidden), float(i)),
            f"decoder.layers.{i}.self_attention.linear_qkv.layer_norm_weight": torch.ones(hidden),
            f"decoder.layers.{i}.self_attention.linear_qkv._extra_state": None}


def test_expert_vs_pipeline_suffix_is_read_from_args(tmp_path) -> None:
    """Synthetic: `mp_rank_00_001` is EP rank 1 when args say ep=2, pp rank 1 when they say pp=2."""
    ep_root = tmp_path / "ep"
    files = {}
    for ep in (0, 1):
        model = {**_layer(0), "decoder.layers.0.mlp.router.weight": torch.ones(4, 16)}
        for j in (0, 1):
            key = f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc1.weight"
            model[key] = torch.full((32, 16), 2.0 * ep + j)
        files[f"mp_rank_00_{ep:03d}"] = {"args": _ns(num_layers=1, expert_model_parallel_size=2),
                                         "checkpoint_version": 3.0, "iteration": 7, "model": model}
    _write(ep_root, files)
    ckpt = _read(str(ep_root))
    assert (ckpt.degrees.tp, ckpt.degrees.pp, ckpt.degrees.ep) == (1, 1, 2) and ckpt.iteration == 7
    experts = {p.name.split("local_experts.")[1].split(".")[0]: p for p in ckpt.params if "local_experts" in p.name}
    assert sorted(experts) == ["0", "1", "2", "3"]
    for gid, p in experts.items():
        assert float(read_tensor(p.fragments[0].tensor)[0, 0]) == float(gid)
    assert [p.name for p in ckpt.params].count("decoder.layers.0.mlp.router.weight") == 1
    assert not any("_extra_state" in p.name for p in ckpt.params)
    assert {f.ep for f in ckpt.files} == {0, 1}

    pp_root = tmp_path / "pp"
    _write(pp_root, {f"mp_rank_00_{pp:03d}": {"args": _ns(pipeline_model_parallel_size=2), "checkpoint_version": 3.0,
                                              "iteration": 7, "model": _layer(0)} for pp in (0, 1)})
    ckpt = _read(str(pp_root))
    assert (ckpt.degrees.pp, ckpt.degrees.ep) == (2, 1)
    assert {p.name for p in ckpt.params if "linear_qkv.weight" in p.name} == {
        "decoder.layers.0.self_attention.linear_qkv.weight", "decoder.layers.1.self_attention.linear_qkv.weight"}


def test_virtual_pipeline_chunks_and_grouped_query(tmp_path) -> None:
    """Synthetic: VPP chunks `model0/model1` are renumbered chunk-major; GQA args reach the QKV rule."""
    root = tmp_path / "vpp"
    files = {}
    for tp in (0, 1):
        for pp in (0, 1):
            chunks = {}
            for vp in (0, 1):
                layer = _layer(0)
                key = "decoder.layers.0.self_attention.linear_qkv.weight"
                layer[key] = torch.full((24, 16), float(10 * (vp * 2 + pp) + tp))
                chunks[f"model{vp}"] = layer
            files[f"mp_rank_{tp:02d}_{pp:03d}"] = {
                "args": _ns(num_layers=4, tensor_model_parallel_size=2, pipeline_model_parallel_size=2,
                            group_query_attention=True, num_query_groups=2, num_attention_heads=8),
                "checkpoint_version": 3.0, "iteration": 7, **chunks}
    _write(root, files, tracker="release")  # the tracker names no iteration folder here
    runs = discover(str(root))
    assert runs[0].latest_tag is None and not runs[0].iterations[0].latest
    ckpt = read_checkpoint(pick_iteration(runs[0]))
    assert (ckpt.degrees.tp, ckpt.degrees.pp) == (2, 2) and ckpt.warnings == ()
    for g in range(4):
        p = ckpt.param(f"decoder.layers.{g}.self_attention.linear_qkv.weight")
        assert p.shape == (48, 16)
        spec = spec_for(ckpt, p.name)
        assert spec.label == "qkv gqa 2/8"
        merged = _merged(ckpt, p)
        assert merged[0, 0] == 10 * g and merged[-1, 0] == 10 * g + 1  # tp rank 0 rows first, then tp rank 1


def test_uneven_pipeline_offsets(tmp_path) -> None:
    """Synthetic: stage 0 holds 1 layer, stage 1 holds 3 (decoder_first_pipeline_num_layers=1)."""
    def run(first: int) -> Checkpoint:
        root = tmp_path / f"first{first}"
        args = _ns(num_layers=4, pipeline_model_parallel_size=2, decoder_first_pipeline_num_layers=first)
        stage1 = {k: v for i in range(3) for k, v in _layer(i).items()}
        _write(root, {"mp_rank_00_000": {"args": args, "checkpoint_version": 3.0, "model": _layer(0)},
                      "mp_rank_00_001": {"args": args, "checkpoint_version": 3.0, "model": stage1}})
        return _read(str(root))

    ckpt = run(1)
    assert ckpt.warnings == ()
    for g in range(4):
        p = ckpt.param(f"decoder.layers.{g}.self_attention.linear_qkv.weight")
        assert {s.pp for s in p.shards} == {0 if g == 0 else 1}
        assert float(read_tensor(p.fragments[0].tensor)[0, 0]) == (0 if g == 0 else g - 1)
    assert any("decoder_first_pipeline_num_layers=2" in w for w in run(2).warnings)


def test_inconsistent_tensor_parallel_ranks(tmp_path) -> None:
    """Synthetic: a replicated norm whose shape differs on tp rank 1, then a parameter missing on tp rank 1."""
    args = _ns(num_layers=1, tensor_model_parallel_size=2)
    bad = _layer(0)
    bad["decoder.layers.0.self_attention.linear_qkv.layer_norm_weight"] = torch.ones(8)
    _write(tmp_path / "shape", {"mp_rank_00": {"args": args, "model": _layer(0)},
                                "mp_rank_01": {"args": args, "model": bad}})
    with pytest.raises(CheckpointError, match=r"mp_rank_01.*layer_norm_weight: shape \[8\] on tp rank 1"):
        _read(str(tmp_path / "shape"))
    less = {k: v for k, v in _layer(0).items() if "layer_norm" not in k}
    _write(tmp_path / "missing", {"mp_rank_00": {"args": args, "model": _layer(0)},
                                  "mp_rank_01": {"args": args, "model": less}})
    with pytest.raises(CheckpointError, match=r"layer_norm_weight: no tensor on tp rank\(s\) \[1\]"):
        _read(str(tmp_path / "missing"))
