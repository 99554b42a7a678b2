"""Hugging Face safetensors (single or indexed shards): tensors described from each file's JSON header only."""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..layout import Checkpoint, Degrees, Format, IterationRef, Param, RankFile, Run
from ..tensorref import ITEMSIZE
from .base import CheckpointFormat, DirListing, register

if TYPE_CHECKING:
    import torch

SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
MAX_HEADER = 100 * 1024 * 1024

# safetensors dtype code -> torch dtype name
DTYPES: dict[str, str] = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "C64": "complex64",
}


@dataclass(frozen=True)
class SafetensorsRef:
    """One tensor of a safetensors file: absolute byte range [data_start, data_end) of its row-major data."""

    file: str
    dtype: str  # torch name, or the raw safetensors code when torch has no equivalent
    shape: tuple[int, ...]
    data_start: int
    data_end: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


def read_header(path: str) -> tuple[dict[str, Any], int, int]:
    """The JSON header of one file, the absolute offset where tensor data starts, and the file size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(path, f"file is {size} bytes: too small for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER:
                raise CheckpointError(path, f"safetensors header claims {n} bytes (over the {MAX_HEADER}-byte limit)")
            if n > size - 8:
                raise CheckpointError(path, f"safetensors header claims {n} bytes but the file has {size} (truncated)")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(path, f"cannot read ({exc.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise CheckpointError(path, "safetensors header is not valid JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, f"safetensors header is a JSON {type(header).__name__}, not an object")
    return header, 8 + n, size


def _refs_of(path: str) -> tuple[dict[str, SafetensorsRef], dict[str, Any], int]:
    header, base, size = read_header(path)
    meta = header.pop("__metadata__", None)
    refs: dict[str, SafetensorsRef] = {}
    for name, entry in header.items():
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = isinstance(code, str) and all(isinstance(s, int) and s >= 0 for s in shape) \
                and isinstance(begin, int) and isinstance(end, int)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CheckpointError(path, f"tensor {name!r} has a malformed header entry")
        dtype = DTYPES.get(code, code)
        itemsize = ITEMSIZE.get(dtype)
        if not 0 <= begin <= end or base + end > size:
            raise CheckpointError(path, f"tensor {name!r} data [{begin}, {end}) lies outside the file (truncated?)")
        if itemsize is not None and end - begin != prod(shape) * itemsize:
            raise CheckpointError(path, f"tensor {name!r} holds {end - begin} bytes, its shape {list(shape)} of "
                                        f"{dtype} needs {prod(shape) * itemsize}")
        refs[name] = SafetensorsRef(path, dtype, shape, base + begin, base + end)
    return refs, (meta if isinstance(meta, dict) else {}), size


def _shard_files(d: str, files: tuple[str, ...]) -> tuple[list[str], dict[str, Any] | None, str | None]:
    """The files to read: those an index names (when there is exactly one index), else every *.safetensors file."""
    indexes = [f for f in files if f.endswith(INDEX_SUFFIX)]
    if len(indexes) == 1:
        ipath = os.path.join(d, indexes[0])
        try:
            with open(ipath, encoding="utf-8") as fh:
                index = json.load(fh)
        except OSError as exc:
            raise CheckpointError(ipath, f"cannot read ({exc.strerror})") from None
        except (UnicodeDecodeError, ValueError):
            raise CheckpointError(ipath, "index is not valid JSON") from None
        wmap = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise CheckpointError(ipath, "index has no weight_map of tensor name -> file")
        names = sorted(set(wmap.values()))
        for name in names:
            if os.path.basename(name) != name or not os.path.isfile(os.path.join(d, name)):
                raise CheckpointError(ipath, f"weight_map names {name!r}, which is not a file in this directory")
        return names, index, ipath
    return [f for f in files if f.endswith(SUFFIX)], None, None


class SafetensorsFormat(CheckpointFormat):
    """A directory of `*.safetensors` files (e.g. `model.safetensors`, or indexed `model-0000i-of-0000N`)."""

    format = Format.SAFETENSORS

    def claim_run(self, listing: DirListing) -> Run | None:
        if not any(f.endswith(SUFFIX) for f in listing.files):
            return None
        root = listing.path
        tag = os.path.basename(root.rstrip(os.sep)) or root
        ref = IterationRef(root, root, tag, None, True, self.format)
        return Run(root, self.format, (ref,), latest_tag=tag)

    def read(self, ref: IterationRef) -> Checkpoint:
        d = ref.path
        names, index, ipath = _shard_files(d, DirListing.of(d).files)
        if not names:
            raise CheckpointError(d, "no .safetensors files")
        warnings: list[str] = []
        refs: dict[str, SafetensorsRef] = {}
        file_meta: dict[str, dict[str, Any]] = {}
        files: list[RankFile] = []
        for name in names:
            path = os.path.join(d, name)
            found, meta, size = _refs_of(path)
            files.append(RankFile(path, "safetensors", size))
            file_meta[name] = meta
            for key, sref in found.items():
                if key in refs:
                    warnings.append(f"{key}: in both {os.path.basename(refs[key].file)} and {name}; keeping the first")
                    continue
                refs[key] = sref
        if index is not None and ipath is not None:
            files.append(RankFile(ipath, "index", os.path.getsize(ipath)))
            wmap = index["weight_map"]
            for key, fname in wmap.items():
                if key not in refs:
                    warnings.append(f"{key}: the index names {fname}, whose header does not hold it")
                elif (actual := os.path.basename(refs[key].file)) != fname:
                    warnings.append(f"{key}: the index names {fname}, the tensor is in {actual}")
            total = index.get("metadata", {}).get("total_size") if isinstance(index.get("metadata"), dict) else None
            held = sum(r.data_end - r.data_start for r in refs.values())
            if isinstance(total, int) and total != held:
                warnings.append(f"index metadata.total_size is {total} bytes, the headers describe {held}")
        params = tuple(Param(name=k, shape=r.shape, dtype=r.dtype, flags=() if r.dtype in ITEMSIZE else
                             (f"dtype {r.dtype} has no torch equivalent here",)) for k, r in sorted(refs.items()))
        dtypes = Counter(p.dtype for p in params)
        return Checkpoint(
            path=d, run_root=ref.run_root, format=self.format, tag=ref.tag, iteration=None, latest=True,
            degrees=Degrees(), zero_stage=None, dtype=dtypes.most_common(1)[0][0] if dtypes else None,
            optimizer=None, optimizer_states=(), files=tuple(files), params=params,
            meta={"safetensors": refs, "file_metadata": file_meta, "index": index}, warnings=tuple(warnings),
        )


def read_safetensors_tensor(ref: SafetensorsRef, *, copy: bool = True) -> torch.Tensor:
    """The tensor's values, read through a shared read-only mmap (a private copy unless copy=False)."""
    import torch

    from ..tensor_io import torch_dtype
    from ..torchzip import MappedFile

    if ref.dtype not in ITEMSIZE:
        raise CheckpointError(ref.file, f"dtype {ref.dtype} cannot be read as a torch tensor")
    dtype = torch_dtype(ref.dtype)
    if ref.numel == 0:
        return torch.empty(ref.shape, dtype=dtype)
    mf = MappedFile.open(ref.file)
    if mf.map is None or ref.data_end > mf.size or ref.data_end - ref.data_start != ref.numel * ITEMSIZE[ref.dtype]:
        raise CheckpointError(ref.file, f"tensor bytes [{ref.data_start}, {ref.data_end}) do not fit the file")
    t = torch.frombuffer(mf.map, dtype=dtype, count=ref.numel, offset=ref.data_start).view(ref.shape)
    return t.clone() if copy else t


register(SafetensorsFormat())
