"""Read tensor bytes described by a TensorRef through mmap: whole tensors or flat element ranges."""

from __future__ import annotations

import threading
import warnings
from typing import TYPE_CHECKING

from .errors import CheckpointError
from .tensorref import TensorRef
from .torchzip import MappedFile, TorchZip

if TYPE_CHECKING:
    import torch

warnings.filterwarnings("ignore", message="The given buffer is not writable")

_zip_cache: dict[tuple[str, int], TorchZip] = {}
_zip_lock = threading.Lock()


def _zip_for(ref: TensorRef) -> TorchZip:
    key = (ref.file, ref.base_offset)
    with _zip_lock:
        z = _zip_cache.get(key)
    if z is None:
        z = TorchZip(ref.file, base_offset=ref.base_offset)
        with _zip_lock:
            _zip_cache[key] = z
    return z


def forget_files() -> None:
    """Drop cached zip directories and maps (call after files changed on disk)."""
    with _zip_lock:
        _zip_cache.clear()
    MappedFile.forget()


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return getattr(torch, name)


def _storage_view(ref: TensorRef, first: int, count: int) -> torch.Tensor:
    """A zero-copy 1-D view of `count` storage elements starting at element `first`."""
    import torch

    z = _zip_for(ref)
    rec = z.storage_record(ref.storage_key)
    base = z.data_offset(rec)
    itemsize = ref.itemsize
    if (first + count) * itemsize > rec.size:
        raise CheckpointError(ref.file, f"read past the end of storage data/{ref.storage_key}")
    mf = MappedFile.open(ref.file)
    if mf.map is None or base + (first + count) * itemsize > mf.size:
        raise CheckpointError(ref.file, "file is shorter than its zip directory says (truncated)")
    if count == 0:
        return torch.empty(0, dtype=torch_dtype(ref.dtype))
    return torch.frombuffer(mf.map, dtype=torch_dtype(ref.dtype), count=count, offset=base + first * itemsize)


def read_tensor(ref: TensorRef, *, copy: bool = True) -> torch.Tensor:
    """The whole tensor (a private copy unless copy=False, which returns a view of the read-only map)."""
    import torch

    if ref.numel == 0:
        return torch.empty(ref.shape, dtype=torch_dtype(ref.dtype))
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
    if start < 0 or start + numel > ref.numel:
        raise CheckpointError(
            ref.file, f"fragment [{start}, {start + numel}) lies outside a {ref.numel}-element tensor"
        )
    if ref.is_contiguous:
        t = _storage_view(ref, ref.storage_offset + start, numel)
        return t.clone() if copy else t
    return read_tensor(ref, copy=False).reshape(-1)[start : start + numel].clone()
