"""Read tensor bytes described by a TensorRef through mmap: whole tensors or flat element ranges."""

from __future__ import annotations

import os
import threading
import warnings
from typing import TYPE_CHECKING

from .errors import CheckpointError
from .tensorref import ITEMSIZE, TensorRef
from .torchzip import MappedFile, TorchZip

if TYPE_CHECKING:
    import torch

warnings.filterwarnings("ignore", message="The given buffer is not writable")

_zip_cache: dict[tuple[str, int, int | None], TorchZip] = {}
_zip_lock = threading.Lock()


def _zip_for(ref: TensorRef) -> TorchZip:
    key = (ref.file, ref.base_offset, ref.base_length)
    with _zip_lock:
        z = _zip_cache.get(key)
    if z is None:
        z = TorchZip(ref.file, base_offset=ref.base_offset, length=ref.base_length)
        with _zip_lock:
            _zip_cache[key] = z
    return z


def forget_files() -> None:
    """Drop cached zip directories and maps (call after files changed on disk)."""
    with _zip_lock:
        _zip_cache.clear()
    MappedFile.forget()


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype called `name`: only dtypes a checkpoint can hold, never an arbitrary torch attribute."""
    import torch

    dtype = getattr(torch, name, None) if name in ITEMSIZE else None
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unsupported tensor dtype {name!r}")
    return dtype


def _dtype_of(ref: TensorRef) -> torch.dtype:
    try:
        return torch_dtype(ref.dtype)
    except ValueError as exc:
        raise CheckpointError(ref.file, str(exc)) from None


def _map(path: str) -> MappedFile:
    try:
        mf = MappedFile.open(path)
        size = os.stat(path).st_size
    except (OSError, ValueError) as exc:
        raise CheckpointError(path, f"cannot map file ({getattr(exc, 'strerror', None) or exc})") from None
    if size < mf.size:  # touching pages past the new end of a mapped file would kill the process (SIGBUS)
        MappedFile.forget(path)
        raise CheckpointError(path, f"file shrank from {mf.size} to {size} bytes while open (truncated?)")
    return mf


def record_offset(ref: TensorRef) -> int:
    """Absolute file offset of the first byte of the storage record holding `ref` (for file-to-file copies)."""
    z = _zip_for(ref)
    rec = z.storage_record(ref.storage_key)
    if ref.extent() * ref.itemsize > rec.size:
        raise CheckpointError(ref.file, f"tensor reaches past the end of storage data/{ref.storage_key}")
    return z.data_offset(rec)


def raw_bytes(ref: TensorRef, start: int, count: int) -> memoryview:
    """Zero-copy bytes of elements [start, start+count) of a contiguous tensor, straight from the file's map."""
    if not ref.is_contiguous or start < 0 or start + count > ref.numel:
        raise CheckpointError(ref.file, f"cannot take elements [{start}, {start + count}) of this tensor as bytes")
    first = record_offset(ref) + (ref.storage_offset + start) * ref.itemsize
    mf = _map(ref.file)
    end = first + count * ref.itemsize
    if mf.map is None or end > mf.size:
        raise CheckpointError(ref.file, "file is shorter than its zip directory says (truncated)")
    return memoryview(mf.map)[first:end]


def _storage_view(ref: TensorRef, first: int, count: int) -> torch.Tensor:
    """A zero-copy 1-D view of `count` storage elements starting at element `first`."""
    import torch

    dtype = _dtype_of(ref)
    if count == 0:
        return torch.empty(0, dtype=dtype)
    z = _zip_for(ref)
    rec = z.storage_record(ref.storage_key)
    base = z.data_offset(rec)
    itemsize = ref.itemsize
    if first < 0 or count < 0 or (first + count) * itemsize > rec.size:
        raise CheckpointError(ref.file, f"read past the end of storage data/{ref.storage_key}")
    mf = _map(ref.file)
    if mf.map is None or base + (first + count) * itemsize > mf.size:
        raise CheckpointError(ref.file, "file is shorter than its zip directory says (truncated)")
    return torch.frombuffer(mf.map, dtype=dtype, count=count, offset=base + first * itemsize)


def read_tensor(ref: TensorRef, *, copy: bool = True) -> torch.Tensor:
    """The whole tensor (a private copy unless copy=False, which returns a view of the read-only map)."""
    import torch

    if ref.numel == 0:
        return torch.empty(ref.shape, dtype=_dtype_of(ref))
    if ref.is_contiguous:
        flat = _storage_view(ref, ref.storage_offset, ref.numel)
        t = flat.view(ref.shape)
    else:
        span = ref.extent() - ref.storage_offset
        flat = _storage_view(ref, ref.storage_offset, span)
        t = flat.as_strided(ref.shape, ref.stride)
    return t.clone() if copy else t


def read_flat(ref: TensorRef, start: int, numel: int, *, copy: bool = True) -> torch.Tensor:
    """Elements [start, start+numel) of the tensor in row-major order, reading only those bytes when contiguous."""
    if start < 0 or numel < 0 or start + numel > ref.numel:
        raise CheckpointError(
            ref.file, f"fragment [{start}, {start + numel}) lies outside a {ref.numel}-element tensor"
        )
    if ref.is_contiguous:
        t = _storage_view(ref, ref.storage_offset + start, numel)
        return t.clone() if copy else t
    return read_tensor(ref, copy=False).reshape(-1)[start : start + numel].clone()
