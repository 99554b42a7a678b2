"""Write torch.save-compatible zip files without torch: tensors streamed from byte chunks (e.g. mmap views).

The layout is what torch 2.x writes (`<name>/data.pkl` at protocol 2, `.format_version`, `.storage_alignment`,
`byteorder`, `data/<key>` aligned to 64 bytes, `version`, `.data/serialization_id`), so `torch.load` and DeepSpeed
read it like any other checkpoint file. Used where an output tensor is a plain concatenation of source fragments:
the bytes go from the page cache to the output once, with no tensor library in between.
"""

from __future__ import annotations

import io
import os
import secrets
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from ..atomic import temp_path
from ..tensorref import ITEMSIZE, STORAGE_DTYPES
from .torch_save import _named_global, _StandInPickler

ALIGN = 64
STORAGE_NAMES = {dtype: name for name, (dtype, _) in STORAGE_DTYPES.items()}


class RawTensor:
    """A contiguous tensor to write: dtype, shape and a function yielding its bytes in order."""

    def __init__(self, dtype: str, shape: tuple[int, ...], chunks: Callable[[], Iterable[memoryview | bytes]]) -> None:
        self.dtype = dtype
        self.shape = tuple(int(s) for s in shape)
        self.chunks = chunks
        self.key = ""

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    def stride(self) -> tuple[int, ...]:
        out, acc = [], 1
        for s in reversed(self.shape):
            out.append(acc)
            acc *= s
        return tuple(reversed(out))


class _Storage:
    def __init__(self, tensor: RawTensor) -> None:
        self.tensor = tensor


class _TensorPickler(_StandInPickler):
    """Pickles RawTensors the way torch.save does: a `_rebuild_tensor_v2` call on a persistent storage id."""

    def __init__(self, fh: io.BytesIO, tensors: list[RawTensor]) -> None:
        super().__init__(fh, protocol=2)
        self.tensors = tensors

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            t = obj.tensor
            return ("storage", _named_global(f"torch.{STORAGE_NAMES[t.dtype]}"), t.key, "cpu", t.numel)
        return None

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, RawTensor):
            obj.key = str(len(self.tensors))
            self.tensors.append(obj)
            return (_named_global("torch._utils._rebuild_tensor_v2"),
                    (_Storage(obj), 0, obj.shape, obj.stride(), False, OrderedDict()))
        return super().reducer_override(obj)


def _aligned_info(zf: zipfile.ZipFile, name: str) -> zipfile.ZipInfo:
    """A stored entry whose data starts on a 64-byte boundary (padding in a local-header extra field, as torch)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    offset = zf.fp.tell() + 30 + len(name.encode())
    pad = (-(offset + 4)) % ALIGN
    info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad  # 'FB' padding block
    return info


def save_torch_zip(obj: Any, path: str) -> int:
    """Write `obj` (dicts/lists of plain values and RawTensors) to `path` atomically; returns the bytes written."""
    tensors: list[RawTensor] = []
    buf = io.BytesIO()
    _TensorPickler(buf, tensors).dump(obj)
    prefix = os.path.splitext(os.path.basename(path))[0] or "archive"
    tmp = temp_path(path)
    with open(tmp, "wb") as fh, zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        records: list[tuple[str, Any]] = [
            ("data.pkl", buf.getvalue()), (".format_version", b"1"), (".storage_alignment", str(ALIGN).encode()),
            ("byteorder", b"little"),
        ]
        for name, data in records:
            zf.writestr(_aligned_info(zf, f"{prefix}/{name}"), data)
        for t in tensors:
            info = _aligned_info(zf, f"{prefix}/data/{t.key}")
            info.file_size = t.nbytes
            written = 0
            with zf.open(info, "w", force_zip64=t.nbytes >= zipfile.ZIP64_LIMIT) as out:
                for chunk in t.chunks():
                    out.write(chunk)
                    written += len(memoryview(chunk).cast("B"))
            if written != t.nbytes:
                raise ValueError(f"{path}: tensor data/{t.key} got {written} bytes, expected {t.nbytes}")
        zf.writestr(_aligned_info(zf, f"{prefix}/version"), b"3\n")
        zf.writestr(_aligned_info(zf, f"{prefix}/.data/serialization_id"),
                    str(int.from_bytes(secrets.token_bytes(16), "little")).zfill(40)[:40].encode())
    os.replace(tmp, path)
    return os.path.getsize(path)
