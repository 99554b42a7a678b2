"""DCP / Megatron-Core torch_dist reader on the real megatron-core 0.16.1 checkpoint and a real one-process DCP save.

`torch.load` is used ONLY on the trusted oracle `reference.pt`; `torch.distributed.checkpoint.save` writes the plain
DCP case with the real library (a tmp_path checkpoint, not an imitation).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from fixture_paths import assert_reads_without_torch

from engine.discover import discover, read_checkpoint
from engine.errors import CheckpointError
from engine.formats.dcp import ChunkBox, _read_chunk, read_global_tensor
from engine.layout import Format

CASE = Path(__file__).parent / "fixtures" / "megatron-core-0.16.1" / "gpt_tp2"


def _copy_case(tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(CASE / "ckpt", dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


@pytest.fixture(scope="module")
def ckpt():
    runs = discover(str(CASE))
    assert [r.format for r in runs] == [Format.TORCH_DIST]
    (ref,) = runs[0].iterations
    assert ref.latest and ref.tag == "iter_0000001"
    return read_checkpoint(ref)


@pytest.fixture(scope="module")
def reference():
    return torch.load(CASE / "reference.pt", map_location="cpu", weights_only=False)


def test_torch_dist_layout(ckpt):
    exp = json.loads((CASE / "expected.json").read_text())
    assert ckpt.format == Format.TORCH_DIST
    assert ckpt.iteration == exp["iteration"]
    assert {p.name: p.shape for p in ckpt.params} == {k: tuple(v) for k, v in exp["params"].items()}
    assert ckpt.degrees.tp == 2 and ckpt.degrees.dp == 1
    assert ckpt.dtype == "float32"
    assert all(p.dtype == "float32" for p in ckpt.params)
    assert any(name.endswith("_extra_state/shard_0_2") for name in ckpt.meta["bytes_entries"])
    assert not any("_extra_state" in p.name for p in ckpt.params)


def test_global_tensors_bit_exact(ckpt, reference):
    assert set(reference) == {p.name for p in ckpt.params}
    for name, want in reference.items():
        got = read_global_tensor(ckpt, name)
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got, want), name


def test_fragments_and_boxes_agree_with_reference(ckpt, reference):
    lengths = ckpt.meta["dcp_zip_lengths"]
    boxed = 0
    for p in ckpt.params:
        chunks = ckpt.meta["dcp_chunks"][p.name]
        assert all(isinstance(box, ChunkBox) for box, _ in chunks)
        assert sum(box.numel for box, _ in chunks) == p.numel
        flat = reference[p.name].reshape(-1)
        for box, ref in chunks:
            assert torch.equal(_read_chunk(ref, lengths[(ref.file, ref.base_offset)]), reference[p.name][box.slices])
        if not p.fragments:
            boxed += 1
            continue
        for frag in p.fragments:
            chunk = _read_chunk(frag.tensor, lengths[(frag.tensor.file, frag.tensor.base_offset)]).reshape(-1)
            assert torch.equal(chunk, flat[frag.dst_start : frag.dst_start + frag.numel])
    assert boxed == 2  # linear_proj and linear_fc2 are split on their last dim: boxes, not flat runs
    assert ckpt.param("decoder.layers.self_attention.linear_proj.weight").partition_dim == 2
    assert ckpt.param("embedding.word_embeddings.weight").partition_dim == 0


def test_plain_dcp_written_by_torch(tmp_path: Path):
    import torch.distributed.checkpoint as dcp

    state = {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(3, dtype=torch.bfloat16)}, "step": 7}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(tmp_path / "dcp"))
    (run,) = discover(str(tmp_path))
    assert run.format == Format.DCP
    ck = read_checkpoint(run.iterations[0])
    assert {(p.name, p.shape, p.dtype) for p in ck.params} == {("model.w", (3, 4), "float32"),
                                                               ("model.b", (3,), "bfloat16")}
    assert ck.meta["bytes_entries"] == ("step",)
    assert torch.equal(read_global_tensor(ck, "model.w"), state["model"]["w"])
    assert torch.equal(read_global_tensor(ck, "model.b"), state["model"]["b"])


def test_truncated_distcp_names_the_file(tmp_path: Path):
    root = _copy_case(tmp_path)
    bad = root / "iter_0000001" / "__1_1.distcp"
    bad.write_bytes(bad.read_bytes()[:1000])
    (run,) = discover(str(root))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(run.iterations[0])
    assert str(bad) in str(info.value) and "truncated" in str(info.value)


def test_corrupt_metadata_names_the_file(tmp_path: Path):
    root = _copy_case(tmp_path)
    bad = root / "iter_0000001" / ".metadata"
    bad.write_bytes(bad.read_bytes()[:200])
    (run,) = discover(str(root))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(run.iterations[0])
    assert str(bad) in str(info.value) and "\n" not in str(info.value)




def test_metadata_read_does_not_import_torch():
    assert_reads_without_torch(CASE)
