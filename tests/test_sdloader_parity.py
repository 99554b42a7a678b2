"""Parity with DeepSpeed's MegatronSDLoader / WeightQuantization (real outputs under tests/fixtures/sdloader).

For every version folder and every oracle case, the target module dicts are computed here from the `tp{src}`
files (metadata reader + mmap reads; no torch.load on inputs) with `classify_megatron` + `rules.merge/split`
and `quantize.quantize_module`. They must equal DeepSpeed's result where SUMMARY.md says DeepSpeed is right,
and the native `tp{dst}` checkpoint (the ground truth) everywhere, including where DeepSpeed is wrong
(quantized v0 merges, `final_linear` merges) or crashes (quantized splits, v3.0). The oracle rank files are
DeepSpeed's own output and are trusted (torch.load with weights_only=False).
"""

from __future__ import annotations

import json
import os
from functools import cache

import pytest
import torch

from engine.quantize import (
    F_KEYS,
    F_SCALES,
    QUANT_ENTRY,
    dequantize_entry,
    merge_count_for,
    quantize_module,
)
from engine.rules import classify_megatron, merge, split
from engine.safe_unpickle import load_torch_metadata
from engine.tensor_io import read_tensor

SDL = os.path.join(os.path.dirname(__file__), "fixtures", "sdloader")
VERSIONS = ("v0", "v1.0", "v2.0", "v2.0_final_linear", "v3.0")
QKV_KEYS = {f"language_model.encoder.layers.{i}.self_attention.query_key_value.{p}" for i in (0, 1)
            for p in ("weight", "bias")}


@cache
def source(version: str, tp: int) -> tuple[tuple[dict[str, torch.Tensor], ...], float | None, int]:
    """The tp-rank module dicts of `tp{tp}`, the file's checkpoint_version (None when absent) and head count."""
    mods = []
    version_key = heads = None
    for r in range(tp):
        sd = load_torch_metadata(os.path.join(SDL, version, f"tp{tp}", "global_step10",
                                              f"mp_rank_{r:02d}_model_states.pt")).obj
        mods.append({k: read_tensor(v) for k, v in sd["module"].items()})
        version_key, heads = sd.get("checkpoint_version"), sd["args"].num_attention_heads
    return tuple(mods), version_key, heads


@cache
def resharded(version: str, src: int, dst: int) -> tuple[dict[str, torch.Tensor], ...]:
    """Our `dst` rank modules from the `tp{src}` files: merges of consecutive ranks, or splits of each rank."""
    mods, ver, heads = source(version, src)
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(dst)]
    for name in mods[0]:
        spec = classify_megatron(name, checkpoint_version=ver, tp=src, num_heads=heads)
        if src >= dst:
            k = src // dst
            for r in range(dst):
                out[r][name] = merge(spec, [mods[r * k + i][name] for i in range(k)])
        else:
            k = dst // src
            for i in range(src):
                for j, piece in enumerate(split(spec, mods[i][name], k)):
                    out[i * k + j][name] = piece
    return tuple(out)


@cache
def oracle(version: str, case: str, rank: int) -> dict:
    return torch.load(os.path.join(SDL, version, "oracle", case, f"rank{rank}.pt"), weights_only=False)


def kind_of(src: int, dst: int) -> str:
    return "merge" if src > dst else "split" if src < dst else "identity"


def sdloader_status(version: str, src: int, dst: int, quantize: bool) -> tuple[str, set[str]]:
    """What SUMMARY.md says DeepSpeed 0.19.8 did: ("right"|"wrong"|"error", keys it got wrong)."""
    kind = kind_of(src, dst)
    if quantize and kind == "split":
        return "error", set()  # merge_scales_split: "Sizes of tensors must match"
    if version == "v3.0" and not quantize and kind != "identity":
        return "error", set()  # "checkpoint version: 3.0 is not supported"
    if version == "v0" and quantize and kind == "merge":
        return "wrong", set(QKV_KEYS)  # int8 QKV and fp16 QKV bias concatenated without the v0 regrouping
    if version == "v2.0_final_linear" and kind == "merge":
        return "wrong", {"final_linear.weight"}  # keeps rank 0's shard
    return "right", set()


CASES = [(v, c) for v in VERSIONS for c in sorted(os.listdir(os.path.join(SDL, v, "oracle")))
         if os.path.isdir(os.path.join(SDL, v, "oracle", c))]


def parse(case: str) -> tuple[int, int, bool]:
    tps, q = case.split("_")
    src, dst = tps.split("to")
    return int(src), int(dst), q == "q1"


def test_every_case_is_covered() -> None:
    assert len(VERSIONS) == len([d for d in os.listdir(SDL) if d.startswith("v")])
    kinds = {parse(c)[:2] for _, c in CASES}
    assert kinds == {(4, 2), (4, 1), (2, 1), (1, 2), (1, 4), (2, 4), (1, 1), (2, 2), (4, 4)}
    assert len(CASES) == len(VERSIONS) * 18


@pytest.mark.parametrize("version,case", [c for c in CASES if not parse(c[1])[2]])
def test_merge_split_parity(version: str, case: str) -> None:
    src, dst, _ = parse(case)
    status, wrong = sdloader_status(version, src, dst, False)
    case_dir = os.path.join(SDL, version, "oracle", case)
    assert os.path.exists(os.path.join(case_dir, "ERROR.json")) == (status == "error")
    ours = resharded(version, src, dst)
    truth = source(version, dst)[0]
    for r in range(dst):
        assert list(ours[r]) == list(truth[r])
        for name, t in truth[r].items():
            assert torch.equal(ours[r][name], t), (r, name)
        if status == "error":
            continue
        theirs = oracle(version, case, r)["sd"]["module"]
        assert list(theirs) == list(ours[r])
        differ = {n for n in theirs if not torch.equal(theirs[n], ours[r][n])}
        assert differ == wrong  # equal where DeepSpeed is right; corrected exactly where it is wrong


def _quantized(version: str, src: int, dst: int) -> list[tuple[dict, dict]]:
    return [quantize_module(m, mp_size=dst, merge_count=merge_count_for(src, dst))
            for m in resharded(version, src, dst)]


@pytest.mark.parametrize("version,case", [c for c in CASES if parse(c[1])[2]])
def test_quantized_parity(version: str, case: str) -> None:
    src, dst, _ = parse(case)
    status, wrong = sdloader_status(version, src, dst, True)
    case_dir = os.path.join(SDL, version, "oracle", case)
    assert os.path.exists(os.path.join(case_dir, "ERROR.json")) == (status == "error")
    truth = source(version, dst)[0]
    for r, (qm, entry) in enumerate(_quantized(version, src, dst)):
        qnames = {k["name"] for k in entry[F_KEYS]}
        assert len(qnames) == 8 and all(qm[n].dtype == torch.int8 for n in qnames)
        assert entry[F_SCALES].shape[:2] == (2, 4)
        for name, t in truth[r].items():
            if name in qnames:
                diff = (dequantize_entry(entry, name, qm[name]) - t.float()).abs()
                err_max, err_mean = float(diff.max()), float(diff.mean())
                bound = float(t.float().abs().max()) / 127
                assert err_max <= bound and err_mean <= bound / 4, (name, err_max, bound)
            else:
                assert torch.equal(qm[name], t), name  # float keys: the ground truth, always
        if status == "error":
            # DeepSpeed crashes; ours equals DeepSpeed quantizing the native tp{dst} checkpoint (identity load)
            ident = oracle(version, f"{dst}to{dst}_q1", r)
            assert all(torch.equal(qm[n], ident["sd"]["module"][n]) for n in qm)
            assert torch.equal(entry[F_SCALES], ident["all_scales"])
            continue
        theirs = oracle(version, case, r)
        differ = {n for n in qm if not torch.equal(qm[n], theirs["sd"]["module"][n])}
        assert differ == wrong
        if version == "v0" and kind_of(src, dst) == "merge":
            rows_equal = [torch.equal(entry[F_SCALES][:, j], theirs["all_scales"][:, j]) for j in range(4)]
            assert rows_equal == [False, True, True, True]  # the QKV row follows our correct regrouping
        else:
            assert torch.equal(entry[F_SCALES], theirs["all_scales"])


@pytest.mark.parametrize("version", VERSIONS)
def test_split_then_merge_is_identity(version: str) -> None:
    mods, ver, heads = source(version, 1)
    four = source(version, 4)[0]
    for name, full in mods[0].items():
        spec = classify_megatron(name, checkpoint_version=ver, tp=1, num_heads=heads)
        for tp in (2, 4):
            assert torch.equal(merge(spec, split(spec, full, tp)), full), (name, tp)
        shards = [m[name] for m in four]
        again = split(spec, merge(spec, shards), 4)
        assert all(torch.equal(a, b) for a, b in zip(again, shards, strict=True)), name
        two = [merge(spec, shards[i:i + 2]) for i in (0, 2)]
        assert all(torch.equal(a, b) for a, b in zip([p for t in two for p in split(spec, t, 2)], shards,
                                                     strict=True)), name


def test_quant_entry_is_plain_and_named() -> None:
    qm, entry = _quantized("v2.0", 4, 2)[1]
    assert QUANT_ENTRY == "ckpt_explorer_quantization"
    assert entry["bits"] == 8 and entry["groups"] == 64 and entry["mlp_extra_grouping"] is True
    assert entry["merge_count"] == 2 and entry["mp_size"] == 2 and entry["rows"] == ["qkv", "dense", "h4h", "4hh"]
    recs = {k["name"].split(".", 3)[-1]: k for k in entry[F_KEYS]}
    assert recs["0.self_attention.dense.weight"]["merge_dim"] == 1
    assert recs["0.self_attention.query_key_value.weight"]["merge_dim"] == 0
    json.dumps([k for k in entry[F_KEYS]])  # plain data besides the scales tensor
