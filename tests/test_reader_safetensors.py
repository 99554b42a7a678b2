"""HF safetensors reader. The files here are synthetic (written in tmp_path with the `safetensors` library) because
safetensors is an export format, not a training checkpoint: no fixture run writes one, and the library's own writer is
the ground truth for the layout.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from fixture_paths import assert_reads_without_torch
from safetensors.torch import save_file

from engine.discover import discover, read_checkpoint
from engine.errors import CheckpointError
from engine.formats.safetensors_hf import SafetensorsRef, read_header, read_safetensors_tensor
from engine.layout import Format


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(10, 8, generator=g),
        "layers.0.weight": torch.randn(8, 8, generator=g).to(torch.bfloat16),
        "layers.0.bias": torch.randn(8, generator=g).to(torch.float16),
        "quant.scale": torch.randint(-100, 100, (4, 3), generator=g, dtype=torch.int8),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 5),
    }


def _read_single(path: Path):
    (run,) = discover(str(path))
    assert run.format == Format.SAFETENSORS
    (ref,) = run.iterations
    assert ref.tag == path.name and ref.iteration is None and ref.latest
    return read_checkpoint(ref)


def _check_values(ckpt, tensors: dict[str, torch.Tensor]) -> None:
    assert {p.name: (p.shape, p.dtype) for p in ckpt.params} == {
        k: (tuple(t.shape), str(t.dtype).removeprefix("torch.")) for k, t in tensors.items()
    }
    for name, want in tensors.items():
        ref = ckpt.meta["safetensors"][name]
        assert isinstance(ref, SafetensorsRef)
        got = read_safetensors_tensor(ref)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert all(p.fragments == () for p in ckpt.params)
    assert (ckpt.degrees.tp, ckpt.degrees.pp, ckpt.degrees.dp) == (1, 1, 1)


def test_single_file(tmp_path: Path):
    d = tmp_path / "export"
    d.mkdir()
    tensors = _tensors()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    ckpt = _read_single(d)
    _check_values(ckpt, tensors)
    assert ckpt.meta["file_metadata"]["model.safetensors"] == {"format": "pt"}
    assert ckpt.warnings == ()


def test_indexed_shards(tmp_path: Path):
    d = tmp_path / "hf"
    d.mkdir()
    tensors = _tensors()
    names = sorted(tensors)
    shards = [names[:3], names[3:]]
    weight_map, total = {}, 0
    for i, part in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in part}, str(d / fname))
        weight_map.update({k: fname for k in part})
        total += sum(tensors[k].numel() * tensors[k].element_size() for k in part)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    ckpt = _read_single(d)
    _check_values(ckpt, tensors)
    assert ckpt.warnings == ()
    assert sorted(f.role for f in ckpt.files) == ["index", "safetensors", "safetensors"]
    # a wrong total_size in the index is reported, not ignored
    (d / "model.safetensors.index.json").write_text(json.dumps({**index, "metadata": {"total_size": total + 4}}))
    assert any("total_size" in w for w in read_checkpoint(discover(str(d))[0].iterations[0]).warnings)


def test_index_naming_a_missing_file(tmp_path: Path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                                "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(discover(str(tmp_path))[0].iterations[0])
    assert str(index) in str(info.value)


def _corrupt(tmp_path: Path, how: str) -> Path:
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    data = path.read_bytes()
    if how == "huge":
        data = struct.pack("<Q", 1 << 40) + data[8:]
    elif how == "over_file":
        data = struct.pack("<Q", len(data)) + data[8:]
    elif how == "truncated":
        data = data[: len(data) // 2]
    elif how == "not_json":
        (n,) = struct.unpack("<Q", data[:8])
        data = data[:8] + b"\xff" * n + data[8 + n :]
    elif how == "not_object":
        header = b"[1, 2, 3]"
        data = struct.pack("<Q", len(header)) + header
    elif how == "short":
        data = data[:5]
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("how", ["huge", "over_file", "truncated", "not_json", "not_object", "short"])
def test_corrupt_file_names_the_file(tmp_path: Path, how: str):
    path = _corrupt(tmp_path, how)
    (run,) = discover(str(tmp_path))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(run.iterations[0])
    message = str(info.value)
    assert message.startswith(str(path) + ": ") and "\n" not in message


def test_read_header_gives_data_start(tmp_path: Path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(256, 256)}, str(path))
    header, data_start, size = read_header(str(path))
    assert header["w"]["shape"] == [256, 256] and data_start + 256 * 256 * 4 == size




def test_metadata_read_does_not_import_torch(tmp_path: Path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    assert_reads_without_torch(tmp_path)
