"""Write a re-chunked Megatron-Core `torch_dist` checkpoint: `__R_0.distcp` rank files, then `.metadata` from them."""

from __future__ import annotations

import io
import json
import os
import pickle
from dataclasses import dataclass, replace
from typing import Any

from ..atomic import temp_path
from ..errors import CheckpointError
from ..formats.dcp import ChunkBox
from ..plan import PlanItem
from ..tensorref import TensorRef

DONE_DIR = ".ckpt-explorer-done"  # per-rank sidecars (chunk offsets); execute_plan removes it after verifying


def rank_file(rank: int) -> str:
    return f"__{rank}_0.distcp"


@dataclass(frozen=True)
class DistSource:
    """A saved source chunk that overlaps an output chunk: its box, its tensor, its embedded zip's length."""

    box: ChunkBox
    ref: TensorRef
    length: int | None


@dataclass(frozen=True)
class DistChunk:
    """One output chunk: the tensor's name and dtype, its box in the global tensor, the source chunks it reads."""

    name: str
    dtype: str
    box: ChunkBox
    sources: tuple[DistSource, ...]


def _assemble(chunk: DistChunk) -> Any:
    """The chunk's tensor, copied from only the overlapping parts of the source chunks (mmap views)."""
    import torch

    from ..tensor_io import read_tensor, torch_dtype

    box = chunk.box
    out = torch.empty(box.sizes, dtype=torch_dtype(chunk.dtype))
    covered = 0
    for src in chunk.sources:
        lo = [max(a, b) for a, b in zip(box.offsets, src.box.offsets)]
        hi = [min(a + s, b + t) for a, s, b, t in zip(box.offsets, box.sizes, src.box.offsets, src.box.sizes)]
        if any(h <= lo_ for lo_, h in zip(lo, hi)):
            continue
        ref = src.ref if src.length is None or src.ref.base_length else replace(src.ref, base_length=src.length)
        view = read_tensor(ref, copy=False)
        if tuple(view.shape) != src.box.sizes:
            raise CheckpointError(ref.file, f"chunk of {chunk.name} at byte {ref.base_offset} is "
                                            f"{list(view.shape)}, .metadata says {list(src.box.sizes)}")
        dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, box.offsets))
        sel = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, src.box.offsets))
        out[dst] = view[sel]
        n = 1
        for a, b in zip(lo, hi):
            n *= b - a
        covered += n
    if covered != box.numel:
        raise CheckpointError(chunk.name, f"source chunks cover {covered} of the {box.numel} elements of the chunk "
                                          f"at {list(box.offsets)}")
    return out


def _with_new_args(obj: Any, tp: int, pp: int) -> Any:
    """A common-state dict as real objects, its `args` carrying the new degrees."""
    from .reshard import _update_args
    from .torch_save import materialize

    obj = {k: materialize(v) for k, v in obj.items()}
    _update_args(obj, tp, pp, None)
    return obj


def _bytes_entry(entry: dict[str, Any], tp: int, pp: int) -> bytes:
    """A BYTES entry: the source's byte range, or the common state re-saved with the new degrees in `args`."""
    if entry.get("update_args"):
        import torch

        from ..safe_unpickle import load_torch_metadata
        from .torch_save import _pickle_module

        obj = load_torch_metadata(entry["src"], base_offset=entry["offset"], length=entry["length"]).obj
        buf = io.BytesIO()
        torch.save(_with_new_args(obj, tp, pp), buf, pickle_module=_pickle_module)
        return buf.getvalue()
    with open(entry["src"], "rb") as fh:
        fh.seek(entry["offset"])
        data = fh.read(entry["length"])
    if len(data) != entry["length"]:
        raise CheckpointError(entry["src"], f"bytes entry {entry['name']} at byte {entry['offset']} is truncated")
    return data


def _write_json(path: str, obj: Any) -> None:
    tmp = temp_path(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(obj, fh)
    os.replace(tmp, path)


def write_reshard_dist_rank(item: PlanItem, root: str, report: Any = None) -> int:
    """One `__R_0.distcp`: the rank's byte entries, then each chunk as its own torch.save zip; offsets to a sidecar."""
    import torch

    a = item.args
    path = os.path.join(root, item.outputs[0])
    tmp = temp_path(path)
    tensors: list[list[Any]] = []
    byte_recs: list[list[Any]] = []
    with open(tmp, "wb") as fh:
        for entry in a["bytes"]:
            data = _bytes_entry(entry, a["tp"], a["pp"])
            byte_recs.append([entry["name"], fh.tell(), len(data)])
            fh.write(data)
        for chunk in a["chunks"]:
            buf = io.BytesIO()
            torch.save(_assemble(chunk).contiguous(), buf)
            data = buf.getvalue()
            tensors.append([chunk.name, list(chunk.box.offsets), fh.tell(), len(data)])
            fh.write(data)
            if report is not None:
                report(fh.tell())
        fh.flush()
        os.fsync(fh.fileno())
        size = fh.tell()
    os.replace(tmp, path)
    _write_json(os.path.join(root, item.outputs[1]), {"file": os.path.basename(path), "size": size,
                                                      "tensors": tensors, "bytes": byte_recs})
    return size


def write_reshard_dist_common(item: PlanItem, root: str, report: Any = None) -> int:
    """`common.pt` with `args.tensor_model_parallel_size` / `pipeline_model_parallel_size` set to the new degrees."""
    from ..safe_unpickle import load_torch_metadata
    from .torch_save import save_atomic

    a = item.args
    obj = load_torch_metadata(a["src"]).obj
    return save_atomic(_with_new_args(obj, a["tp"], a["pp"]), os.path.join(root, item.outputs[0]), standins=True)


def write_reshard_dist_metadata(item: PlanItem, root: str, report: Any = None) -> int:
    """`.metadata`: real torch.distributed.checkpoint Metadata built from the rank sidecars, pickled plainly."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from ..tensor_io import torch_dtype

    a = item.args
    tag = a["tag"]
    where: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
    for r in range(a["world"]):
        side = os.path.join(root, DONE_DIR, f"{tag}.rank{r}.json")
        try:
            with open(side, encoding="utf-8") as fh:
                rec = json.load(fh)
        except (OSError, ValueError):
            raise CheckpointError(side, f"offsets of rank {r} missing: its rank file was not written") from None
        data = os.path.join(root, tag, rec["file"])
        if not os.path.isfile(data) or os.path.getsize(data) != rec["size"]:
            raise CheckpointError(data, f"rank file does not have the {rec['size']} bytes its sidecar records")
        for name, offsets, off, length in rec["tensors"]:
            where[(name, tuple(offsets))] = (rec["file"], off, length)
        for name, off, length in rec["bytes"]:
            where[(name, None)] = (rec["file"], off, length)
    sdm: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    for entry in a["order"]:
        if entry[0] == "bytes":
            name = entry[1]
            sdm[name] = BytesStorageMetadata()
            keys = [(name, None)]
        else:
            _, name, dtype, size, boxes = entry
            chunks = [ChunkStorageMetadata(offsets=torch.Size(b.offsets), sizes=torch.Size(b.sizes)) for b in boxes]
            sdm[name] = TensorStorageMetadata(properties=TensorProperties(dtype=torch_dtype(dtype)),
                                              size=torch.Size(size), chunks=chunks)
            keys = [(name, tuple(b.offsets)) for b in boxes]
        for key in keys:
            loc = where.get(key)
            if loc is None:
                raise CheckpointError(os.path.join(root, tag), f"{key[0]}: no rank file recorded the chunk at {key[1]}")
            index = MetadataIndex(key[0], torch.Size(key[1]) if key[1] is not None else None)
            storage[index] = _StorageInfo(relative_path=loc[0], offset=loc[1], length=loc[2])
    md = Metadata(state_dict_metadata=sdm, planner_data=None, storage_data=storage, version="1.0.0")
    path = os.path.join(root, item.outputs[0])
    tmp = temp_path(path)
    with open(tmp, "wb") as fh:
        pickle.dump(md, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return os.path.getsize(path)
