"""Corrupt and truncated checkpoint files: every failure is a one-line CheckpointError naming the file.

The inputs are real DeepSpeed 0.19.8 / Megatron-DeepSpeed files from tests/fixtures, damaged in tmp_path
(truncated at chosen points of their zip structure, bytes flipped, replaced by other kinds of files).
"""

from __future__ import annotations

import random
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from engine.errors import CheckpointError
from engine.safe_unpickle import load_torch_metadata
from engine.tensor_io import forget_files, read_flat, read_tensor
from engine.tensorref import TensorRef

FIXTURES = Path(__file__).parent / "fixtures"
Z1 = FIXTURES / "deepspeed-0.19.8/z1_bf16_ws2/ckpt/global_step3"
SOURCES = [
    Z1 / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
    Z1 / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
    Z1 / "mp_rank_00_model_states.pt",
    FIXTURES / "megatron-deepspeed/gpt_pipe_tp2_pp2_dp1_bf16/ckpt/global_step10/layer_01-model_00-model_states.pt",
]


def _ids(p: Path) -> str:
    return p.name


def assert_clean_error(path: Path, fn, *args) -> CheckpointError:
    """fn(*args) must raise CheckpointError (no other type) with a one-line message that starts with the path."""
    with pytest.raises(CheckpointError) as info:
        fn(*args)
    msg = str(info.value)
    assert msg.startswith(f"{path}: "), msg
    assert "\n" not in msg and len(msg) < len(str(path)) + 300, msg
    assert info.value.problem
    return info.value


def loads_or_clean_error(path: Path) -> bool:
    """Load, or fail only with a clean CheckpointError. True when it loaded."""
    try:
        load_torch_metadata(str(path))
    except CheckpointError as exc:
        assert str(exc).startswith(f"{path}: ") and "\n" not in str(exc), str(exc)
        return False
    return True


def layout(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (first data byte, size) of every member, plus the central directory as '<cdir>'."""
    raw = path.read_bytes()
    out = {}
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            nlen, xlen = struct.unpack_from("<HH", raw, info.header_offset + 26)
            out[info.filename] = (info.header_offset + 30 + nlen + xlen, info.file_size)
    eocd = raw.rfind(b"PK\x05\x06")
    cd_size, cd_offset = struct.unpack_from("<II", raw, eocd + 12)
    out["<cdir>"] = (cd_offset, cd_size)
    return out


def member(lay: dict[str, tuple[int, int]], suffix: str) -> tuple[int, int]:
    return next(v for k, v in lay.items() if k.endswith(suffix))


def biggest_storage(lay: dict[str, tuple[int, int]]) -> tuple[int, int]:
    return max((v for k, v in lay.items() if "/data/" in k), key=lambda v: v[1])


@pytest.fixture()
def clean_maps():
    forget_files()
    yield
    forget_files()


@pytest.mark.parametrize("src", SOURCES, ids=_ids)
def test_truncated(tmp_path: Path, src: Path, clean_maps) -> None:
    lay = layout(src)
    size = src.stat().st_size
    pkl_start, pkl_size = member(lay, "/data.pkl")
    st_start, st_size = biggest_storage(lay)
    cd_start, cd_size = lay["<cdir>"]
    points = {
        "zero bytes": 0,
        "ten bytes": 10,
        "inside data.pkl": pkl_start + pkl_size // 2,
        "end of data.pkl": pkl_start + pkl_size,
        "inside a storage": st_start + st_size // 2,
        "inside the central directory": cd_start + cd_size // 2,
        "end of the central directory": cd_start + cd_size,
        "one byte short": size - 1,
    }
    for what, cut in points.items():
        path = tmp_path / f"{what.replace(' ', '_')}_{src.name}"
        path.write_bytes(src.read_bytes()[:cut])
        err = assert_clean_error(path, load_torch_metadata, str(path))
        assert any(word in err.problem for word in ("truncated", "empty", "too small", "corrupt", "zip")), err


@pytest.mark.parametrize("src", SOURCES, ids=_ids)
def test_truncated_storage_read(tmp_path: Path, src: Path, clean_maps) -> None:
    """Metadata read from the whole file, then the file loses its tail: read_tensor / read_flat raise
    CheckpointError (the zip directory is gone, or the record runs past the end)."""
    path = tmp_path / src.name
    shutil.copy(src, path)
    refs = load_torch_metadata(str(path)).report.tensors
    ref = max(refs, key=lambda r: r.nbytes)
    st_start, st_size = biggest_storage(layout(src))
    with open(path, "r+b") as fh:
        fh.truncate(st_start + st_size // 2)
    assert_clean_error(path, read_tensor, ref)
    assert_clean_error(path, read_flat, ref, 0, 1)


def test_read_after_file_shrank_under_a_live_map(tmp_path: Path) -> None:
    """A map made before the file shrank must not be touched past the new end (that would be SIGBUS, killing the
    process). Run in a child process so a crash shows up as a failure, not a dead test run."""
    src = SOURCES[3]
    path = tmp_path / src.name
    shutil.copy(src, path)
    code = f"""
import os
from engine.safe_unpickle import load_torch_metadata
from engine.tensor_io import read_tensor
from engine.errors import CheckpointError
path = {str(path)!r}
refs = sorted(load_torch_metadata(path).report.tensors, key=lambda r: r.nbytes)
read_tensor(refs[0])
os.truncate(path, 4096)
try:
    read_tensor(refs[-1])
except CheckpointError as e:
    print("CLEAN", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).parent.parent)
    assert out.returncode == 0, out.stderr[-800:]
    assert f"CLEAN {path}: " in out.stdout and "shrank" in out.stdout


def test_every_single_byte_flip_in_data_pkl(tmp_path: Path) -> None:
    """Flip each byte of a real optimizer pickle in turn: load, or fail with CheckpointError; nothing else."""
    src = SOURCES[0]
    raw = src.read_bytes()
    start, size = member(layout(src), "/data.pkl")
    path = tmp_path / src.name
    path.write_bytes(raw)
    outcomes = {True: 0, False: 0}
    with open(path, "r+b") as fh:
        for pos in range(start, start + size):
            fh.seek(pos)
            fh.write(bytes([raw[pos] ^ 0xFF]))
            fh.flush()
            outcomes[loads_or_clean_error(path)] += 1
            fh.seek(pos)
            fh.write(raw[pos : pos + 1])
    assert outcomes[False] > size // 4, outcomes  # most flips break the pickle...
    assert outcomes[True] > 0, outcomes  # ...some only change a value


@pytest.mark.parametrize("src", SOURCES, ids=_ids)
def test_random_corruption(tmp_path: Path, src: Path) -> None:
    """Seeded random flips in data.pkl and in the central directory."""
    rng = random.Random(src.name)
    lay = layout(src)
    original = src.read_bytes()
    path = tmp_path / src.name
    for region in (member(lay, "/data.pkl"), lay["<cdir>"]):
        start, size = region
        for _ in range(60):
            raw = bytearray(original)
            for _ in range(rng.randint(1, 8)):
                raw[start + rng.randrange(size)] = rng.randrange(256)
            path.write_bytes(raw)
            loads_or_clean_error(path)


def test_legacy_torch_file(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=False)
    err = assert_clean_error(path, load_torch_metadata, str(path))
    assert "legacy" in err.problem


@pytest.mark.parametrize("kind", ["random", "text", "empty", "zip without data.pkl", "deflated pickle",
                                  "directory", "missing"])
def test_not_a_checkpoint(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "model_states.pt"
    if kind == "random":
        path.write_bytes(random.Random(1).randbytes(100_000))
    elif kind == "text":
        path.write_text("this is not a checkpoint\n" * 100)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "zip without data.pkl":
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("archive/version", "3")
    elif kind == "deflated pickle":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("archive/data.pkl", b"\x80\x02]q\x00." * 10)
    elif kind == "directory":
        path.mkdir()
    assert_clean_error(path, load_torch_metadata, str(path))


def test_truncated_tensor_ref_outside_record(tmp_path: Path, clean_maps) -> None:
    """A TensorRef that claims more elements than its record holds is refused by read_tensor."""
    src = SOURCES[0]
    refs = load_torch_metadata(str(src)).report.tensors
    ref = max(refs, key=lambda r: r.nbytes)
    bad = TensorRef(ref.file, ref.storage_key, ref.dtype, (ref.numel + 10,), (1,), 0, ref.storage_numel + 10)
    assert_clean_error(src, read_tensor, bad)
    odd = TensorRef(ref.file, ref.storage_key, "load", ref.shape, ref.stride, 0, ref.storage_numel)
    assert_clean_error(src, read_tensor, odd)
