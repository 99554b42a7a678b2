"""Reshard of the real Megatron-Core 0.16.1 `torch_dist` checkpoint (tp2): -> tp1, -> tp4, tp4 -> tp2, and pp2.

Global tensors must stay bit-identical (our reader and PyTorch's own `dcp_to_torch_save` both read the output);
only the chunking changes. `torch.load` is used ONLY on the trusted oracle `reference.pt` and on the file that
`dcp_to_torch_save` writes from our output. The SwiGLU chunk rule is tested on synthetic chunk metadata: the
fixture has no SwiGLU and writing one needs megatron-core, which is not installed here.
"""

from __future__ import annotations

import json
import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from app.cli import main
from engine.discover import discover, read_checkpoint
from engine.errors import PlanError
from engine.execute import execute_plan
from engine.formats.dcp import ChunkBox, read_global_tensor
from engine.layout import Format, Param
from engine.plan import Target, plan_conversion
from engine.plan_reshard_torch_dist import _tensor_chunks
from engine.tensorref import TensorRef
from tests.fixture_paths import FIXTURES

CASE = Path(FIXTURES) / "megatron-core-0.16.1" / "gpt_tp2"
SRC_ITER = CASE / "ckpt" / "iter_0000001"


def _read(root: Path):
    runs = discover(str(root))
    assert [r.format for r in runs] == [Format.TORCH_DIST]
    return read_checkpoint(runs[0].iterations[0])


def _boxes(ckpt) -> dict[str, set[tuple[tuple[int, ...], tuple[int, ...]]]]:
    return {n: {(b.offsets, b.sizes) for b, _ in pairs} for n, pairs in ckpt.meta["dcp_chunks"].items()}


def _rank_of(ref: TensorRef) -> int:
    return int(os.path.basename(ref.file).split("_")[2])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("reshard_dist")
    src = _read(CASE / "ckpt")
    execute_plan(plan_conversion(src, Target(kind="reshard", tp=1)), str(base / "tp1"), workers=1)
    execute_plan(plan_conversion(src, Target(kind="reshard", tp=4)), str(base / "tp4"), workers=2)
    four = _read(base / "tp4")
    execute_plan(plan_conversion(four, Target(kind="reshard", tp=2)), str(base / "tp2"), workers=1)
    execute_plan(plan_conversion(src, Target(kind="reshard", tp=2, pp=2)), str(base / "tp2pp2"), workers=1)
    return {k: base / k for k in ("tp1", "tp4", "tp2", "tp2pp2")}


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    return torch.load(CASE / "reference.pt", map_location="cpu", weights_only=False)


@pytest.mark.parametrize("case", ["tp1", "tp4", "tp2", "tp2pp2"])
def test_our_reader_reads_same_global_tensors(outputs, reference, case: str) -> None:
    exp = json.loads((CASE / "expected.json").read_text())
    ckpt = _read(outputs[case])
    assert ckpt.format == Format.TORCH_DIST and ckpt.tag == "iter_0000001" and ckpt.iteration == 1
    assert {p.name: p.shape for p in ckpt.params} == {k: tuple(v) for k, v in exp["params"].items()}
    assert len(ckpt.params) == 17 and set(reference) == {p.name for p in ckpt.params}
    for name, want in reference.items():
        got = read_global_tensor(ckpt, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    it = outputs[case] / "iter_0000001"
    ranks = {"tp1": 1, "tp4": 4, "tp2": 2, "tp2pp2": 4}[case]
    assert sorted(f for f in os.listdir(it) if f.endswith(".distcp")) == [f"__{r}_0.distcp" for r in range(ranks)]
    assert (it / "metadata.json").read_bytes() == (SRC_ITER / "metadata.json").read_bytes()
    assert (it / "common.pt").read_bytes() == (SRC_ITER / "common.pt").read_bytes()  # `{}`: no args to update
    assert (outputs[case] / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert not (outputs[case] / ".ckpt-explorer-done").exists()
    assert sorted(ckpt.meta["bytes_entries"]) == sorted(_read(CASE / "ckpt").meta["bytes_entries"])


@pytest.mark.parametrize("case", ["tp1", "tp4", "tp2"])
def test_pytorch_dcp_reads_our_output(outputs, reference, tmp_path, case: str) -> None:
    it = outputs[case] / "iter_0000001"
    with open(it / ".metadata", "rb") as fh:  # our own output, pickled with the real torch DCP classes
        md = pickle.load(fh)
    assert type(md).__module__ == "torch.distributed.checkpoint.metadata"
    dcp_to_torch_save(str(it), str(tmp_path / "x.pt"))
    got = torch.load(tmp_path / "x.pt", map_location="cpu", weights_only=False)
    for name, want in reference.items():
        assert torch.equal(got[name], want), name
    # the BYTES entries (_extra_state) come back as PyTorch reads them from the source
    dcp_to_torch_save(str(SRC_ITER), str(tmp_path / "src.pt"))
    src = torch.load(tmp_path / "src.pt", map_location="cpu", weights_only=False)
    extra = [k for k in src if "_extra_state" in k]
    assert len(extra) == 8 and all(got[k] == src[k] for k in extra)


def test_chunk_boxes(outputs) -> None:
    src = _read(CASE / "ckpt")
    one, four, two = (_read(outputs[k]) for k in ("tp1", "tp4", "tp2"))
    params = {p.name: p for p in src.params}
    for name, boxes in _boxes(one).items():
        p = params[name]
        stacked = any(f.startswith("stacked") for f in p.flags)
        # one chunk per tensor (per layer slice of a stacked tensor, as Megatron writes them), never split on TP
        assert len(boxes) == (p.shape[0] if stacked else 1), name
        assert all(s[1:] == p.shape[1:] if stacked else s == p.shape for _, s in boxes), name
        d = p.partition_dim
        if d is not None:
            assert {o[d] for o, _ in _boxes(four)[name]} == {i * p.shape[d] // 4 for i in range(4)}, name
            assert {o[d] for o, _ in _boxes(src)[name]} == {i * p.shape[d] // 2 for i in range(2)}, name
    assert _boxes(two) == _boxes(src)
    # the round trip puts each split chunk in its TP rank's file, as Megatron did
    for name, pairs in two.meta["dcp_chunks"].items():
        if params[name].partition_dim is not None:
            d = params[name].partition_dim
            assert all(_rank_of(ref) == b.offsets[d] * 2 // params[name].shape[d] for b, ref in pairs), name


def test_pipeline_stages_get_their_layers(outputs) -> None:
    ckpt = _read(outputs["tp2pp2"])
    assert _boxes(ckpt) == _boxes(_read(CASE / "ckpt"))
    for name, pairs in ckpt.meta["dcp_chunks"].items():
        for box, ref in pairs:
            stage = _rank_of(ref) // 2
            if name.startswith("decoder.layers."):
                assert stage == box.offsets[0], name  # 2 layers over 2 stages
            elif name.startswith("embedding."):
                assert stage == 0, name
            else:
                assert stage == 1, name


def test_dry_run_and_refusals(tmp_path, capsys) -> None:
    src = str(CASE / "ckpt")
    assert main(["reshard", src, str(tmp_path / "x"), "--tp", "4", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert not (tmp_path / "x").exists()
    assert "__3_0.distcp" in out and ".metadata" in out
    assert "column dim 1 of stacked layers; 2 chunks" in out and "1×48×64" in out  # qkv: 192 rows / 4
    assert "row dim 2 of stacked layers; 2 chunks" in out and "1×64×16" in out  # proj: 64 cols / 4
    ckpt = _read(CASE / "ckpt")
    with pytest.raises(PlanError, match="does not divide"):
        plan_conversion(ckpt, Target(kind="reshard", tp=3))
    with pytest.raises(PlanError, match="int8"):
        plan_conversion(ckpt, Target(kind="reshard", tp=1, quantize="int8"))


def test_swiglu_chunks_follow_w_then_v() -> None:
    """Synthetic chunk metadata shaped like Megatron's SwiGLU factory at tp2 (W of rank r at r, V at r + 2)."""
    size = (2, 256, 64)

    def pair(layer: int, part: int) -> tuple[ChunkBox, TensorRef]:
        box = ChunkBox((layer, part * 64, 0), (1, 64, 64))
        ref = TensorRef(f"/x/__{part % 2}_0.distcp", "0", "float32", box.sizes, (4096, 64, 1), 0, 4096)
        return box, ref

    name = "decoder.layers.mlp.linear_fc1.weight"
    pairs = tuple(pair(layer, part) for layer in range(2) for part in range(4))

    class Fake:
        meta = {"dcp_chunks": {name: pairs}}

    param = Param(name, size, "float32", partition_dim=1, rule="column",
                  flags=("stacked: the leading 1 axis(es) index layers/experts",))
    boxes, ranks, label = _tensor_chunks(Fake(), param, 1, 2)  # type: ignore[arg-type]
    assert "SwiGLU" in label
    assert [(b.offsets, b.sizes) for b in boxes] == [((layer, start, 0), (1, 128, 64))
                                                     for layer in range(2) for start in (0, 128)]
    assert ranks == [0, 0, 0, 0]
    boxes, ranks, _ = _tensor_chunks(Fake(), param, 4, 2)  # type: ignore[arg-type]
    assert [b.offsets[1] for b in boxes[:8]] == [0, 128, 32, 160, 64, 192, 96, 224] and ranks[:8] == [
        0, 0, 1, 1, 2, 2, 3, 3]
    # the same boxes written contiguously by rank (0,1 on rank 0; 2,3 on rank 1) are not SwiGLU
    plain = tuple((b, replace(r, file=f"/x/__{b.offsets[1] // 128}_0.distcp")) for b, r in pairs)
    Fake.meta = {"dcp_chunks": {name: plain}}
    boxes, ranks, label = _tensor_chunks(Fake(), param, 2, 2)  # type: ignore[arg-type]
    assert "SwiGLU" not in label and [b.offsets[1] for b in boxes[:2]] == [0, 128]


def test_common_args_get_new_degrees(tmp_path) -> None:
    """The fixture's common.pt is `{}`; a copy whose common.pt holds Megatron-style `args` (written here with
    torch.save, as Megatron's legacy common strategy does) must come out with the new degrees."""
    import argparse
    import shutil

    root = tmp_path / "ckpt"
    shutil.copytree(CASE / "ckpt", root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    args = argparse.Namespace(tensor_model_parallel_size=2, pipeline_model_parallel_size=1, world_size=2,
                              hidden_size=64)
    torch.save({"args": args, "iteration": 1}, root / "iter_0000001" / "common.pt")
    src = _read(root)
    assert src.degrees.tp == 2 and not src.warnings
    execute_plan(plan_conversion(src, Target(kind="reshard", tp=1)), str(tmp_path / "out"), workers=2)
    out = _read(tmp_path / "out")
    assert (out.degrees.tp, out.degrees.pp) == (1, 1) and not out.warnings
    got = torch.load(tmp_path / "out" / "iter_0000001" / "common.pt", weights_only=False)  # our own output
    assert (got["args"].tensor_model_parallel_size, got["args"].world_size, got["args"].hidden_size) == (1, 1, 64)
