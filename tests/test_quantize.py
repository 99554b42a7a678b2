"""int8 weight quantization: DeepSpeed's exact arithmetic, its MLP grouping test, scale layout and dequantization."""

from __future__ import annotations

import os

import pytest
import torch

from engine.quantize import (
    F_KEYS,
    F_SCALES,
    QuantizedTensor,
    dequant_error,
    dequantize,
    entry_multipliers,
    is_mlp,
    merge_count_for,
    quantize_data,
    quantize_module,
    quantize_tensor,
    scale_slot,
)
from engine.safe_unpickle import load_torch_metadata
from engine.tensor_io import read_tensor

SDL = os.path.join(os.path.dirname(__file__), "fixtures", "sdloader")


def deepspeed_quantize_data(data: torch.Tensor, bits: int, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSpeed 0.19.8 `WeightQuantization.quantize_data`, line for line (the reference for edge cases)."""
    data_groups = torch.split(data.float().view(-1), data.numel() // groups)
    max_d = [max(g.max(), g.min().abs()) for g in data_groups]
    data_scale = [float(1 << bits) / (2 * mx + 1e-5) for mx in max_d]
    data_int = [(g * s) for g, s in zip(data_groups, data_scale, strict=True)]
    data_int = [di.round().clamp(-(1 << (bits - 1)), ((1 << (bits - 1)) - 1)) for di in data_int]
    data_int = torch.cat(data_int).reshape(data.shape).to(torch.int8)
    return data_int, torch.cat([s.unsqueeze(0).unsqueeze(0) for s in data_scale])


def _tp1(version: str = "v2.0") -> dict[str, torch.Tensor]:
    sd = load_torch_metadata(os.path.join(SDL, version, "tp1", "global_step10", "mp_rank_00_model_states.pt")).obj
    return {k: read_tensor(v) for k, v in sd["module"].items()}


@pytest.mark.parametrize("shape,groups,bits", [((96, 64), 64, 8), ((10, 10), 7, 8), ((25, 4), 6, 8),
                                               ((35,), 6, 8), ((64, 33), 64, 4), ((7, 3), 2, 2)])
def test_quantize_data_matches_deepspeed_bit_for_bit(shape: tuple[int, ...], groups: int, bits: int) -> None:
    g = torch.Generator().manual_seed(sum(shape) + groups)
    data = (torch.randn(shape, generator=g) * 0.05).half()
    q, scale = quantize_data(data, bits, groups)
    rq, rscale = deepspeed_quantize_data(data, bits, groups)
    assert q.dtype == torch.int8 and q.shape == data.shape
    assert torch.equal(q, rq) and torch.equal(scale, rscale)
    n = data.numel()
    assert scale.shape == (-(-n // (n // groups)), 1)  # one extra, shorter group when numel % groups


def test_quantize_matches_deepspeed_on_a_real_checkpoint() -> None:
    """DeepSpeed's own identity load of the v2.0 tp1 file: int8 and the reciprocal scales."""
    oracle = torch.load(os.path.join(SDL, "v2.0", "oracle", "1to1_q1", "rank0.pt"), weights_only=False)
    module = _tp1()
    qm, entry = quantize_module(module, mp_size=1)
    for rec in entry[F_KEYS]:
        name = rec["name"]
        assert torch.equal(qm[name], oracle["sd"]["module"][name])
        mult, _ = entry_multipliers(entry, name)
        width = mult.numel()
        assert torch.equal(mult, oracle["all_scales"][rec["layer"], rec["row"], :width])
        assert not oracle["all_scales"][rec["layer"], rec["row"], width:].any()  # zero padding
    assert torch.equal(entry[F_SCALES], oracle["all_scales"])
    # the 4h->h and h->4h weights got 2*64 groups (MLP by shape), QKV and dense 64
    groups = {rec["name"].rsplit(".", 2)[-2]: rec["groups"] for rec in entry[F_KEYS]}
    assert groups == {"query_key_value": 64, "dense": 64, "dense_h_to_4h": 128, "dense_4h_to_h": 128}


def test_is_mlp_is_a_shape_ratio() -> None:
    assert is_mlp((256, 64), mp_size=1) and is_mlp((64, 256), mp_size=1)
    assert is_mlp((128, 64), mp_size=2) and not is_mlp((128, 64), mp_size=1)
    assert is_mlp((64, 32), mp_size=2)  # attention dense of a tp2 rank looks like an MLP weight (SUMMARY.md)
    assert is_mlp((64, 32), mp_size=1, merge_count=2)
    assert not is_mlp((192, 64), mp_size=1)


def test_mlp_extra_grouping_switch() -> None:
    w = _tp1()["language_model.encoder.layers.0.mlp.dense_h_to_4h.weight"]
    on = quantize_tensor(w, mp_size=1)
    off = quantize_tensor(w, mp_size=1, mlp_extra_grouping=False)
    assert (on.groups, on.multipliers.numel()) == (128, 128)
    assert (off.groups, off.multipliers.numel()) == (64, 64)
    assert dequant_error(w, on.q, on.multipliers)[0] <= dequant_error(w, off.q, off.multipliers)[0]


def test_row_parallel_merge_interleaves_scales() -> None:
    """Two shards merged on dim 1: multipliers are `1/cat(scales, dim=1).view(-1)`, and dequantize inverts it."""
    g = torch.Generator().manual_seed(7)
    shards = [torch.randn(64, 48, generator=g), torch.randn(64, 48, generator=g) * 3]
    merged = torch.cat(shards, dim=1)
    qt = quantize_tensor(merged, parts=2, merge_dim=1, mp_size=1)
    own = [quantize_data(s, 8, 64) for s in shards]
    assert torch.equal(qt.q, torch.cat([o[0] for o in own], dim=1))
    assert torch.equal(qt.multipliers, (1 / torch.cat([o[1] for o in own], dim=1)).view(-1))
    assert torch.equal(qt.multipliers[1::2], (1 / own[1][1]).view(-1))  # rank 1's groups at odd positions
    back = qt.dequantize()
    err = (back - merged).abs()
    assert float(err[:, :48].max()) <= float(shards[0].abs().max()) / 127
    assert float(err[:, 48:].max()) <= float(shards[1].abs().max()) / 127
    assert float(err[:, :48].max()) < float(err[:, 48:].max())  # each part keeps its own scales


def test_dequant_error_and_bad_inputs() -> None:
    w = _tp1()["language_model.encoder.layers.1.self_attention.query_key_value.weight"]
    qt = quantize_tensor(w)
    mx, mean = dequant_error(w, qt.q, qt.multipliers)
    assert 0 < mean < mx <= float(w.float().abs().max()) / 127
    wrong = dequant_error(w, qt.q, qt.multipliers.flip(0))[0]
    assert wrong > mx  # the error measure sees a wrong scale order
    uneven = torch.randn(10, 10)
    q7 = quantize_tensor(uneven, groups=7)
    assert q7.multipliers.numel() == 8
    with pytest.raises(ValueError, match="groups="):
        dequantize(q7.q, q7.multipliers)
    assert dequant_error(uneven, q7.q, q7.multipliers, groups=7)[0] <= float(uneven.abs().max()) / 127
    with pytest.raises(ValueError):
        quantize_tensor(torch.randn(8))
    with pytest.raises(ValueError):
        quantize_data(torch.randn(4, 4), 8, 64)
    with pytest.raises(ValueError):
        quantize_data(torch.randn(4, 4), 9, 2)
    with pytest.raises(ValueError):
        quantize_tensor(torch.randn(6, 4), parts=4)
    assert isinstance(qt, QuantizedTensor) and qt.parts == 1


def test_scale_slots_and_megatron_core_module() -> None:
    """Megatron-Core names (synthetic module: no quantized Megatron-Core checkpoint exists to compare with)."""
    assert scale_slot("decoder.layers.3.self_attention.linear_qkv.weight") == (0, "decoder.layers.3.")
    assert scale_slot("decoder.layers.3.self_attention.linear_proj.weight") == (1, "decoder.layers.3.")
    assert scale_slot("decoder.layers.3.mlp.linear_fc1.weight") == (2, "decoder.layers.3.")
    assert scale_slot("decoder.layers.3.mlp.linear_fc2.weight") == (3, "decoder.layers.3.")
    assert scale_slot("decoder.layers.3.mlp.linear_fc2.bias") is None
    assert scale_slot("decoder.layers.3.mlp.experts.local_experts.0.linear_fc1.weight") is None
    assert scale_slot("transformer.layers.0.attention.query_key_value.weight") == (0, "transformer.layers.0.")
    g = torch.Generator().manual_seed(3)
    module = {}
    for i in range(3):
        module[f"decoder.layers.{i}.self_attention.linear_qkv.weight"] = torch.randn(96, 32, generator=g)
        module[f"decoder.layers.{i}.self_attention.linear_proj.weight"] = torch.randn(32, 32, generator=g)
        module[f"decoder.layers.{i}.self_attention.linear_proj.bias"] = torch.randn(32, generator=g)
        module[f"decoder.layers.{i}.mlp.linear_fc1.weight"] = torch.randn(128, 32, generator=g)
        module[f"decoder.layers.{i}.mlp.linear_fc2.weight"] = torch.randn(32, 64, generator=g)
    qm, entry = quantize_module(module, mp_size=2, merge_count=2)
    # fc2 parts (32, 32): 2*32*2/32 == 4, an MLP shape -> 2*64 groups per part; fc1 parts (64, 32) are not
    groups = {rec["name"].rsplit(".", 2)[-2]: (rec["groups"], rec["count"]) for rec in entry[F_KEYS]}
    assert groups == {"linear_qkv": (64, 128), "linear_proj": (64, 128), "linear_fc1": (64, 128),
                      "linear_fc2": (128, 256)}
    assert entry[F_SCALES].shape == (3, 4, 256)
    assert qm["decoder.layers.1.self_attention.linear_proj.bias"] is module[
        "decoder.layers.1.self_attention.linear_proj.bias"]
    for rec in entry[F_KEYS]:
        mult, _ = entry_multipliers(entry, rec["name"])
        err = dequant_error(module[rec["name"]], qm[rec["name"]], mult, groups=rec["groups"], parts=rec["parts"],
                            merge_dim=rec["merge_dim"])[0]
        assert err <= float(module[rec["name"]].abs().max()) / 127
        assert rec["merge_dim"] == (1 if rec["row"] in (1, 3) else 0)
    with pytest.raises(ValueError, match="already has"):
        quantize_module({"a.layers.0.mlp.linear_fc1.weight": torch.randn(8, 8),
                         "a.layers.0.mlp.dense_h_to_4h.weight": torch.randn(8, 8)}, mp_size=1, groups=2)
    assert merge_count_for(4, 2) == 2 and merge_count_for(2, 4) == 1 and merge_count_for(2, 2) == 1
