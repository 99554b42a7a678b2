"""Megatron name rules, their agreement with DeepSpeed's own patterns, and the fused-QKV merge/split."""

from __future__ import annotations

import glob
import os
import re

import pytest
import torch

from engine.qkv import GROUPS, HEADS, V0, V1, check_qkv_split, merge_qkv, qkv_layout, split_qkv
from engine.rules import (
    MEGATRON_RULES,
    TpRule,
    TpSpec,
    classify_deepspeed,
    classify_megatron,
    local_shape,
    merge,
    rule_table,
    split,
)
from engine.safe_unpickle import load_torch_metadata
from engine.tensor_io import read_tensor

FIX = os.path.join(os.path.dirname(__file__), "fixtures")
MDS = os.path.join(FIX, "megatron-deepspeed")
SDL = os.path.join(FIX, "sdloader")

# name -> (rule, dim, vocab) with swiglu off and checkpoint_version 3.0
LEGACY = {
    "language_model.embedding.word_embeddings.weight": (TpRule.COLUMN, 0, True),
    "language_model.embedding.position_embeddings.weight": (TpRule.REPLICATED, None, False),
    "language_model.embedding.tokentype_embeddings.weight": (TpRule.REPLICATED, None, False),
    "language_model.encoder.layers.3.input_layernorm.weight": (TpRule.REPLICATED, None, False),
    "language_model.encoder.layers.3.input_norm.bias": (TpRule.REPLICATED, None, False),
    "language_model.encoder.layers.3.self_attention.query_key_value.weight": (TpRule.QKV, 0, False),
    "language_model.encoder.layers.3.self_attention.query_key_value.bias": (TpRule.QKV, 0, False),
    "transformer.layers.0.attention.query_key_value.weight": (TpRule.QKV, 0, False),
    "language_model.encoder.layers.3.self_attention.dense.weight": (TpRule.ROW, 1, False),
    "transformer.layers.0.attention.dense.weight": (TpRule.ROW, 1, False),
    "language_model.encoder.layers.3.self_attention.dense.bias": (TpRule.REPLICATED, None, False),
    "language_model.encoder.layers.3.post_attention_layernorm.weight": (TpRule.REPLICATED, None, False),
    "language_model.encoder.layers.3.mlp.dense_h_to_4h.weight": (TpRule.COLUMN, 0, False),
    "language_model.encoder.layers.3.mlp.dense_h_to_4h.bias": (TpRule.COLUMN, 0, False),
    "language_model.encoder.layers.3.mlp.dense_4h_to_h.weight": (TpRule.ROW, 1, False),
    "language_model.encoder.layers.3.mlp.dense_4h_to_h.bias": (TpRule.REPLICATED, None, False),
    "language_model.encoder.final_layernorm.weight": (TpRule.REPLICATED, None, False),
    "language_model.encoder.final_norm.weight": (TpRule.REPLICATED, None, False),
    "language_model.output_layer.weight": (TpRule.COLUMN, 0, True),
    "word_embeddings_for_head.weight": (TpRule.COLUMN, 0, True),
    "final_linear.weight": (TpRule.COLUMN, 0, True),
    "lm_head.weight": (TpRule.COLUMN, 0, True),
    "tied_modules.embed.word_embeddings.weight": (TpRule.COLUMN, 0, True),
    "4.self_attention.dense.weight": (TpRule.ROW, 1, False),
}
CORE = {
    "embedding.word_embeddings.weight": (TpRule.COLUMN, 0, True),
    "embedding.position_embeddings.weight": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.self_attention.linear_qkv.weight": (TpRule.QKV, 0, False),
    "decoder.layers.0.self_attention.linear_qkv.bias": (TpRule.QKV, 0, False),
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.self_attention.linear_qkv.layer_norm_bias": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.self_attention.q_layernorm.weight": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.self_attention.k_layernorm.weight": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.self_attention.linear_proj.weight": (TpRule.ROW, 1, False),
    "decoder.layers.0.self_attention.linear_proj.bias": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.input_layernorm.weight": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.pre_mlp_layernorm.weight": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.mlp.linear_fc1.weight": (TpRule.COLUMN, 0, False),
    "decoder.layers.0.mlp.linear_fc1.bias": (TpRule.COLUMN, 0, False),
    "decoder.layers.0.mlp.linear_fc1.layer_norm_weight": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.mlp.linear_fc2.weight": (TpRule.ROW, 1, False),
    "decoder.layers.0.mlp.linear_fc2.bias": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.mlp.experts.linear_fc2.weight3": (TpRule.ROW, 1, False),
    "decoder.layers.0.mlp.experts.local_experts.1.linear_fc1.weight": (TpRule.COLUMN, 0, False),
    "decoder.layers.0.mlp.router.weight": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.mlp.router.expert_bias": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.self_attention.linear_q_down_proj.weight": (TpRule.REPLICATED, None, False),
    "decoder.layers.0.self_attention.linear_kv_up_proj.weight": (TpRule.COLUMN, 0, False),
    "decoder.final_layernorm.weight": (TpRule.REPLICATED, None, False),
    "output_layer.weight": (TpRule.COLUMN, 0, True),
}
UNKNOWN = ["decoder.layers.0.self_attention.core_attention.scale", "6.weight", "foo.bar", "mtp.enorm.something"]


@pytest.mark.parametrize("name", sorted({**LEGACY, **CORE}))
def test_megatron_names(name: str) -> None:
    rule, dim, vocab = {**LEGACY, **CORE}[name]
    spec = classify_megatron(name, checkpoint_version=3.0, tp=2, num_heads=8)
    assert (spec.rule, spec.dim, spec.vocab) == (rule, dim, vocab)
    assert spec.pattern is not None and re.search(spec.pattern, name)


def test_every_rule_is_exercised_and_listed() -> None:
    names = list(LEGACY) + list(CORE)
    for rule in MEGATRON_RULES:
        assert any(re.search(rule.pattern, n) for n in names), rule.pattern
    rows = rule_table()
    assert [r["pattern"] for r in rows[:-1]] == [r.pattern for r in MEGATRON_RULES]
    assert rows[-1]["rule"] == "unknown (dim 0)"
    assert any("swiglu" in r["rule"] for r in rows)


@pytest.mark.parametrize("name", UNKNOWN)
@pytest.mark.parametrize("tp", [1, 2])
def test_unknown_names_are_flagged(name: str, tp: int) -> None:
    spec = classify_megatron(name, checkpoint_version=3.0, tp=tp)
    assert spec.rule == TpRule.UNKNOWN and spec.dim == 0


def test_swiglu_and_qkv_parameters() -> None:
    for name in ("language_model.encoder.layers.0.mlp.dense_h_to_4h.weight", "decoder.layers.1.mlp.linear_fc1.bias"):
        assert classify_megatron(name, checkpoint_version=3.0, swiglu=True).rule == TpRule.SWIGLU
        assert classify_megatron(name, checkpoint_version=3.0, swiglu=False).rule == TpRule.COLUMN
    qkv = "language_model.encoder.layers.0.self_attention.query_key_value.weight"
    assert classify_megatron(qkv, checkpoint_version=None).qkv_version == 0.0  # missing version means 0
    assert classify_megatron(qkv, checkpoint_version=1.0).qkv_version == 1.0
    spec = classify_megatron(qkv, checkpoint_version=3.0, num_heads=8, num_groups=2)
    assert qkv_layout(spec) == GROUPS and spec.label == "qkv v3"
    mc = classify_megatron("decoder.layers.0.self_attention.linear_qkv.weight", checkpoint_version=3.0,
                           num_heads=8, num_groups=2)
    assert mc.qkv_version is None and mc.num_groups == 2 and mc.label == "qkv gqa 2/8"
    mha = classify_megatron("decoder.layers.0.self_attention.linear_qkv.weight", checkpoint_version=3.0, num_heads=8)
    assert mha.num_groups == 8 and mha.label == "qkv mcore"
    assert [qkv_layout(classify_megatron(qkv, checkpoint_version=v)) for v in (None, 1.0, 2.0, 3.0)] == \
        [V0, V1, HEADS, HEADS]
    with pytest.raises(ValueError):
        qkv_layout(classify_megatron(qkv, checkpoint_version=4.0))


def _ds_names(case: str) -> tuple[dict, list[str], bool]:
    names: list[str] = []
    uc = None
    swiglu = False
    for path in sorted(glob.glob(os.path.join(MDS, case, "ckpt", "global_step10", "mp_rank_*_model_states.pt"))):
        sd = load_torch_metadata(path).obj
        uc = sd["universal_checkpoint_info"]
        swiglu = bool(sd["args"].swiglu)
        for group in sd["param_shapes"]:
            names += [n for n in group if n not in names]
    return uc, names, swiglu


@pytest.mark.parametrize("case", ["gpt_pipe_tp2_pp2_dp1_bf16_swiglu", "gpt_nopipe_tp2_pp1_dp2_bf16",
                                  "gpt_pipe_tp2_pp2_dp1_fp32"])
def test_one_rule_set_with_deepspeed_patterns(case: str) -> None:
    """Where Megatron-DeepSpeed's own universal_checkpoint_info names a parameter, the Megatron rule agrees."""
    uc, names, swiglu = _ds_names(case)
    assert len(names) >= 30
    ds_unknown, meg_unknown = [], []
    for name in names:
        ds = classify_deepspeed(name, uc, 2)
        meg = classify_megatron(name, checkpoint_version=3.0, swiglu=swiglu, tp=2, num_heads=4)
        if ds.rule == TpRule.UNKNOWN:
            ds_unknown.append(name)
            continue
        if meg.rule == TpRule.UNKNOWN:
            meg_unknown.append(name)
            assert ds.rule == TpRule.REPLICATED
            continue
        assert (meg.rule, meg.dim, meg.vocab) == (ds.rule, ds.dim, ds.vocab), name
        fallback = classify_deepspeed(name, uc, 2, megatron={"checkpoint_version": 3.0, "swiglu": swiglu})
        assert fallback == ds  # a pattern match always wins
    # DeepSpeed has no QKV pattern (nor a column pattern without SwiGLU); its dim-0 default concatenates
    # exactly as the Megatron rule for those names does (v3.0 QKV, column), and the fallback names them
    assert ds_unknown and any("query_key_value" in n for n in ds_unknown)
    for name in ds_unknown:
        spec = classify_deepspeed(name, uc, 2, megatron={"checkpoint_version": 3.0, "num_heads": 4})
        assert spec.dim == 0 and spec.rule == (TpRule.QKV if "query_key_value" in name else TpRule.COLUMN), name
        assert spec.rule != TpRule.QKV or qkv_layout(spec) == HEADS
    # the pipe-module final norm ("6.weight") is named only by position; DeepSpeed's pattern covers it
    assert all(re.fullmatch(r"\d+\.(weight|bias)", n) for n in meg_unknown)


# -- fused QKV -------------------------------------------------------------------------------------------

def _shards(version: str, tp: int, key: str) -> list[torch.Tensor]:
    out = []
    for r in range(tp):
        sd = load_torch_metadata(os.path.join(SDL, version, f"tp{tp}", "global_step10",
                                              f"mp_rank_{r:02d}_model_states.pt")).obj
        out.append(read_tensor(sd["module"][key]))
    return out


@pytest.mark.parametrize("version,ver", [("v0", None), ("v1.0", 1.0), ("v2.0", 2.0), ("v3.0", 3.0)])
@pytest.mark.parametrize("part", ["weight", "bias"])
def test_qkv_merge_split_on_real_shards(version: str, ver: float | None, part: str) -> None:
    key = f"language_model.encoder.layers.1.self_attention.query_key_value.{part}"
    spec = classify_megatron(key, checkpoint_version=ver, num_heads=4)
    full = _shards(version, 1, key)[0]
    for tp in (2, 4):
        shards = _shards(version, tp, key)
        assert torch.equal(merge_qkv(spec, shards), full)
        assert torch.equal(merge(spec, shards), full)
        got = split(spec, full, tp)
        assert all(torch.equal(a, b) for a, b in zip(got, shards, strict=True))
    if version == "v0":  # the regrouping is real: a plain concatenation is not the global tensor
        assert not torch.equal(torch.cat(_shards(version, 2, key)), full)


def _tagged_gqa(ng: int, nh: int, hn: int) -> torch.Tensor:
    """A global grouped-QKV weight whose rows say (group, role, head-in-group, dim): synthetic, no real GQA fixture."""
    rows = []
    per = nh // ng
    for g in range(ng):
        for role, count in (("q", per), ("k", 1), ("v", 1)):
            for h in range(count):
                for d in range(hn):
                    rows.append([g, "qkv".index(role), h, d])
    return torch.tensor(rows, dtype=torch.float32)


def test_grouped_query_split_keeps_whole_groups() -> None:
    spec = classify_megatron("decoder.layers.0.self_attention.linear_qkv.weight", checkpoint_version=3.0,
                             num_heads=8, num_groups=2)
    full = _tagged_gqa(2, 8, 4)
    parts = split(spec, full, 2)
    for r, p in enumerate(parts):
        assert set(p[:, 0].tolist()) == {r}  # rank r holds group r whole: its 4 q heads, k and v
        assert p[:, 1].tolist().count(0) == 4 * 4 and p[:, 1].tolist().count(1) == 4
    assert torch.equal(merge(spec, parts), full)
    with pytest.raises(ValueError, match="cut a group"):
        split(spec, full, 4)
    with pytest.raises(ValueError, match="cut a group"):
        local_shape(spec, tuple(full.shape), 4)
    assert local_shape(spec, tuple(full.shape), 2) == (24, 4)


def test_qkv_split_refuses_cutting_heads() -> None:
    v2 = TpSpec(TpRule.QKV, 0, qkv_version=2.0, num_heads=4)
    v0 = TpSpec(TpRule.QKV, 0, qkv_version=0.0, num_heads=4)
    with pytest.raises(ValueError, match="cut a head"):
        check_qkv_split(v2, 192, 8)
    with pytest.raises(ValueError):
        check_qkv_split(v0, 192, 3)
    with pytest.raises(ValueError, match="three equal"):
        check_qkv_split(TpSpec(TpRule.QKV, 0, qkv_version=2.0), 100, 2)
    check_qkv_split(v0, 192, 4)
    assert local_shape(v0, (192, 64), 4) == (48, 64)
    assert split_qkv(v0, torch.zeros(192, 64), 1)[0].shape == (192, 64)
