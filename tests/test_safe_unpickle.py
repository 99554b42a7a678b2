"""The safe reader on real fixtures: every file loads, tensors read through mmap equal torch.load bit for bit,
read_flat touches only its range, and metadata reading never imports torch.

torch.load(weights_only=False) appears here only as the test oracle on trusted fixtures (with a pickle module that
turns the DeepSpeed / Megatron classes it cannot import into dummies).
"""

from __future__ import annotations

import copy
import pickle
import shutil
import subprocess
import sys
import types
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from engine import standins as S
from engine.safe_unpickle import load_plain_pickle, load_torch_metadata
from engine.tensor_io import forget_files, read_flat, read_tensor
from engine.tensorref import TensorRef
from engine.torchzip import _TAIL, TorchZip

ROOT = Path(__file__).parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
ALL_FILES = sorted([*FIXTURES.rglob("*.pt"), *FIXTURES.rglob("*.bin")])
DCP_METADATA = sorted(FIXTURES.rglob(".metadata"))

# What the fixtures reference beyond plain data, and how the reader treats it: everything real checkpoints name
# is allowlisted (DeepSpeed / Megatron classes become named stand-ins), so nothing is reported as unknown.
EXPECTED_UNKNOWN: set[str] = set()

SAMPLE = [
    "deepspeed-0.19.8/z1_bf16_ws2/ckpt/global_step3/mp_rank_00_model_states.pt",  # bf16 views of one flat buffer
    "deepspeed-0.19.8/z1_bf16_ws2/ckpt/global_step3/bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",  # 0-d step
    "deepspeed-0.19.8/z2_fp16_ws2_forced/ckpt/global_step3/mp_rank_00_model_states.pt",  # fp16
    "deepspeed-0.19.8/tp2_z3_fp32_ws4/ckpt/global_step3/zero_pp_rank_0_mp_rank_00_model_states.pt",  # empty params
    "deepspeed-0.19.8/z3_fp32_ws2/ckpt/global_step3/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    "deepspeed-0.19.8/md3d_pp2_tp2_fp32_ws4/ckpt/global_step2/zero_pp_rank_0_mp_rank_03_optim_states.pt",
    "deepspeed-0.16.5/z1_bf16_ws2/ckpt/global_step3/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
    "deepspeed-0.16.5/z1_bf16_ws2/expected/fp32/pytorch_model.bin",
    "sdloader/v0/oracle/1to2_q0/rank0.pt",  # non-contiguous views
    "sdloader/v0/oracle/1to1_q1/rank0.pt",  # int8
    "megatron-deepspeed/gpt_pipe_tp2_pp2_dp1_bf16/ckpt/global_step10/mp_rank_00_model_states.pt",  # numpy rng, bool
    "megatron-deepspeed/gpt_pipe_tp2_pp2_dp1_bf16/ckpt/global_step10/layer_01-model_00-model_states.pt",
    "megatron-deepspeed/gpt_nopipe_tp2_pp1_dp2_bf16/ckpt/global_step10/mp_rank_01_model_states.pt",
    "megatron-core-0.16.1/gpt_tp2/ckpt/iter_0000001/common.pt",
]


# -- the oracle -------------------------------------------------------------------------------------------------
class _Dummy:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state
        if isinstance(state, dict):
            self.__dict__.update(state)


class _OracleUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return type(name, (_Dummy,), {})


_oracle_pickle = types.ModuleType("oracle_pickle")
_oracle_pickle.__dict__.update({k: getattr(pickle, k) for k in dir(pickle) if not k.startswith("__")})
_oracle_pickle.Unpickler = _OracleUnpickler  # type: ignore[attr-defined]


def oracle(path: Path) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_oracle_pickle)


def tensors_of(obj: Any, prefix: str = "") -> dict[str, Any]:
    """path -> tensor-like leaf, walking dicts, sequences and objects' fields (ours and the oracle's alike)."""
    import torch

    out: dict[str, Any] = {}
    if isinstance(obj, (TensorRef, torch.Tensor)):
        out[prefix] = obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensors_of(v, f"{prefix}/{k}"))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensors_of(v, f"{prefix}/{i}"))
    elif isinstance(obj, S.StandIn):
        out.update(tensors_of(obj.fields(), prefix))
    elif isinstance(obj, _Dummy):
        out.update(tensors_of({k: v for k, v in obj.__dict__.items() if not k.startswith("_") and k != "args"},
                              prefix))
    elif not isinstance(obj, type) and isinstance(getattr(obj, "__dict__", None), dict):  # e.g. argparse.Namespace
        out.update(tensors_of(dict(vars(obj)), prefix))
    return out


def same_bits(a, b) -> bool:
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# -- tests ------------------------------------------------------------------------------------------------------
def test_every_fixture_loads_without_unknown_globals() -> None:
    assert len(ALL_FILES) > 2000
    unknown: Counter[str] = Counter()
    tensors = 0
    for path in ALL_FILES:
        loaded = load_torch_metadata(str(path))
        unknown.update(loaded.report.unknown_globals)
        tensors += len(loaded.report.tensors)
        assert loaded.bytes_read <= path.stat().st_size
    assert set(unknown) == EXPECTED_UNKNOWN, unknown
    assert tensors > 10_000


def test_dcp_metadata_loads_as_standins() -> None:
    assert DCP_METADATA
    for path in DCP_METADATA:
        loaded = load_plain_pickle(str(path))
        assert loaded.report.unknown_globals == EXPECTED_UNKNOWN
        meta = loaded.obj
        assert type(meta).qualname == "torch.distributed.checkpoint.metadata.Metadata"
        sd = meta.fields()["state_dict_metadata"]
        emb = sd["embedding.word_embeddings.weight"]
        assert tuple(emb.fields()["size"]) == (128, 64)
        assert len(emb.fields()["chunks"]) == 2


def test_megatron_standins_carry_their_fields() -> None:
    m = load_torch_metadata(str(FIXTURES / SAMPLE[10])).obj
    args = m["args"]
    assert type(args).qualname == "argparse.Namespace"
    assert args.tensor_model_parallel_size == 2 and args.pipeline_model_parallel_size == 2
    assert isinstance(m["rng_state"][0]["np_rng_state"][1], S.NumpyArray)
    z = load_torch_metadata(str(FIXTURES / SAMPLE[1])).obj["optimizer_state_dict"]
    assert isinstance(z["zero_stage"], S.ZeroStage) and int(z["zero_stage"]) == 1
    frag = next(iter(z["param_slice_mappings"][0].values()))
    assert isinstance(frag, S.FragmentAddress) and frag.numel > 0 and frag.start >= 0
    assert isinstance(z["loss_scaler"], S.LossScaler) and z["loss_scaler"].cur_scale == 1.0
    clone = copy.deepcopy(frag)
    assert type(clone) is S.FragmentAddress and clone.fields() == frag.fields() and clone.state == frag.state


@pytest.mark.parametrize("rel", SAMPLE)
def test_tensors_equal_torch_load(rel: str) -> None:
    path = FIXTURES / rel
    forget_files()
    ours = tensors_of(load_torch_metadata(str(path)).obj)
    theirs = tensors_of(oracle(path))
    assert ours.keys() == theirs.keys()
    by_storage: dict[str, set[int]] = {}
    for key, ref in ours.items():
        want = theirs[key]
        assert ref.shape == tuple(want.shape) and ref.stride == tuple(want.stride()), key
        assert ref.storage_offset == want.storage_offset(), key
        got = read_tensor(ref)
        assert same_bits(got, want), key
        view = read_tensor(ref, copy=False)
        assert same_bits(view, want) and view.is_contiguous() == ref.is_contiguous, key
        if ref.storage_numel:  # empty storages all have data_ptr 0
            by_storage.setdefault(ref.storage_key, set()).add(want.untyped_storage().data_ptr())
    # one storage record <-> one storage in torch's result
    assert all(len(ptrs) == 1 for ptrs in by_storage.values())
    assert len({next(iter(p)) for p in by_storage.values()}) == len(by_storage)


def test_sample_covers_the_hard_cases() -> None:
    """The sample above really contains bf16, fp16, int8, bool, 0-d, empty, non-contiguous, offset views and
    several tensors on one storage (so the equality test checks them)."""
    seen: Counter[str] = Counter()
    for rel in SAMPLE:
        refs = load_torch_metadata(str(FIXTURES / rel)).report.tensors
        keys = Counter(r.storage_key for r in refs)
        for r in refs:
            seen.update({f"dtype:{r.dtype}"})
            seen.update({"0-d"} if r.shape == () else set())
            seen.update({"empty"} if r.numel == 0 else set())
            seen.update({"non-contiguous"} if not r.is_contiguous else set())
            seen.update({"offset"} if r.storage_offset else set())
            seen.update({"shared"} if keys[r.storage_key] > 1 else set())
    for case in ("dtype:bfloat16", "dtype:float16", "dtype:float32", "dtype:int8", "dtype:bool", "0-d", "empty",
                 "non-contiguous", "offset", "shared"):
        assert seen[case] > 0, case


def test_synthetic_dtypes_and_views(tmp_path: Path) -> None:
    """Synthetic (no fixture has them): dtypes torch saves with _rebuild_tensor_v3 (uint16, uint32, float8),
    a transposed view, a stride-0 expanded view and a tensor saved twice."""
    import torch

    base = torch.arange(24, dtype=torch.float32).view(4, 6)
    obj = {
        "u16": torch.arange(5).to(torch.uint16),
        "u32": torch.arange(7).to(torch.uint32),
        "f8": torch.linspace(-2, 2, 9).to(torch.float8_e4m3fn),
        "bf16_scalar": torch.tensor(3.5, dtype=torch.bfloat16),
        "t": base.t(),
        "slice": base[1:3, ::2],
        "expand": torch.ones(1, 3).expand(4, 3),
        "again": base,
        "again2": base,
    }
    path = tmp_path / "synthetic.pt"
    torch.save(obj, path)
    loaded = load_torch_metadata(str(path)).obj
    for key, want in obj.items():
        ref = loaded[key]
        assert ref.dtype == str(want.dtype).removeprefix("torch."), key
        assert same_bits(read_tensor(ref), want), key
        assert same_bits(read_flat(ref, 1, want.numel() - 1), want.reshape(-1)[1:]), key
    assert loaded["again"] is loaded["again2"] or loaded["again"] == loaded["again2"]
    forget_files()


def _storage_span(path: Path, ref: TensorRef) -> tuple[int, int]:
    z = TorchZip(str(path))
    rec = z.storage_record(ref.storage_key)
    return z.data_offset(rec), rec.size


def test_read_flat_reads_exactly_its_range(tmp_path: Path, monkeypatch) -> None:
    import torch

    src = FIXTURES / SAMPLE[0]  # bf16 module weights: contiguous views at offsets into one flat storage
    refs = [r for r in load_torch_metadata(str(src)).report.tensors if r.storage_offset and r.numel > 8]
    assert refs
    ref = max(refs, key=lambda r: r.numel)
    want = oracle(src)
    want = next(v for k, v in tensors_of(want).items() if tensors_of(load_torch_metadata(str(src)).obj)[k] == ref)
    start, count = 3, ref.numel - 7
    calls: list[tuple[int, int]] = []
    real = torch.frombuffer

    def spy(buffer, *, dtype, count, offset):
        calls.append((offset, count))
        return real(buffer, dtype=dtype, count=count, offset=offset)

    monkeypatch.setattr(torch, "frombuffer", spy)
    forget_files()
    got = read_flat(ref, start, count)
    data_start, _ = _storage_span(src, ref)
    assert calls == [(data_start + (ref.storage_offset + start) * ref.itemsize, count)]
    assert same_bits(got, want.reshape(-1)[start : start + count])

    # behaviour: garbage everywhere in the storage record except the requested range changes nothing
    copy_path = tmp_path / src.name
    shutil.copy(src, copy_path)
    copy_path.chmod(0o644)
    lo = data_start + (ref.storage_offset + start) * ref.itemsize
    hi = lo + count * ref.itemsize
    raw = bytearray(copy_path.read_bytes())
    rec_start, rec_size = _storage_span(copy_path, ref)
    for i in range(rec_start, rec_start + rec_size):
        if not lo <= i < hi:
            raw[i] = 0xFF
    copy_path.write_bytes(bytes(raw))
    moved = TensorRef(str(copy_path), ref.storage_key, ref.dtype, ref.shape, ref.stride, ref.storage_offset,
                      ref.storage_numel)
    forget_files()
    assert same_bits(read_flat(moved, start, count), want.reshape(-1)[start : start + count])
    assert not same_bits(read_tensor(moved), want)
    forget_files()


def test_read_flat_bounds(tmp_path: Path) -> None:
    from engine.errors import CheckpointError

    ref = load_torch_metadata(str(FIXTURES / SAMPLE[0])).report.tensors[0]
    for start, count in ((-1, 1), (0, ref.numel + 1), (ref.numel, 1), (2, -1)):
        with pytest.raises(CheckpointError):
            read_flat(ref, start, count)
    assert read_flat(ref, ref.numel, 0).numel() == 0


def test_metadata_reads_only_directory_and_pickle() -> None:
    """bytes_read of load_torch_metadata on the largest fixture: the tail holding the zip directory plus data.pkl."""
    path = max(ALL_FILES, key=lambda p: p.stat().st_size)
    size = path.stat().st_size
    loaded = load_torch_metadata(str(path))
    with zipfile.ZipFile(path) as zf:
        pkl = next(i for i in zf.infolist() if i.filename.endswith("/data.pkl"))
    assert size > 4 * _TAIL
    assert loaded.bytes_read <= _TAIL + 30 + len(pkl.filename) + 128 + pkl.file_size
    assert loaded.bytes_read < size / 10


def test_metadata_path_never_imports_torch() -> None:
    code = f"""
import sys
import engine.safe_unpickle as su
from engine.torchzip import TorchZip
for p in {[str(p) for p in ALL_FILES[::40]]!r}:
    su.load_torch_metadata(p)
for p in {[str(p) for p in DCP_METADATA]!r}:
    su.load_plain_pickle(p)
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "numpy", "deepspeed", "megatron")))
print("IMPORTED", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-800:]
    assert "IMPORTED []" in out.stdout, out.stdout
