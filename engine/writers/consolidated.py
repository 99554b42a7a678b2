"""Consolidated outputs: safetensors written header-first with each tensor pwritten at its offset; torch .bin shards."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

from ..assemble import assemble_state
from ..errors import CheckpointError
from ..plan import PlanItem
from .torch_save import save_atomic

SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int8": "I8",
                      "uint8": "U8", "int32": "I32", "int64": "I64", "bool": "BOOL", "int16": "I16"}
DONE_DIR = ".ckpt-explorer-done"


def safetensors_header(tensors: list[tuple[str, str, tuple[int, ...]]]) -> tuple[bytes, dict[str, int]]:
    """The header bytes (length prefix included, padded to 8) and each tensor's data offset after it."""
    from ..tensorref import ITEMSIZE

    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offsets: dict[str, int] = {}
    pos = 0
    for name, dtype, shape in tensors:
        n = ITEMSIZE[dtype]
        for s in shape:
            n *= s
        meta[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets[name] = pos
        pos += n
    body = json.dumps(meta, separators=(",", ":")).encode()
    body += b" " * (-(len(body) + 8) % 8)
    return len(body).to_bytes(8, "little") + body, offsets


def _pwrite(path: str, offset: int, data: memoryview | bytes, size: int | None = None) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if size is not None and os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(fd, view[done:], offset + done)
    finally:
        os.close(fd)


def _marker(root: str, item: PlanItem) -> str:
    safe = zlib.crc32(item.id.encode())
    return os.path.join(root, DONE_DIR, f"{safe:08x}-{len(item.id)}")


def write_safetensors_header(item: PlanItem, root: str, report: Any = None) -> int:
    path = os.path.join(root, item.outputs[0])
    _pwrite(path, 0, item.args["header"], item.args["file_size"])
    return len(item.args["header"])


def _tensor_bytes(t: Any) -> memoryview:
    """A zero-copy byte view of a tensor's memory (no numpy: torch does not require it)."""
    import ctypes

    t = t.contiguous()
    nbytes = t.numel() * t.element_size()
    if not nbytes:
        return memoryview(b"")
    buf = (ctypes.c_char * nbytes).from_address(t.data_ptr())
    buf._owner = t  # type: ignore[attr-defined]  # keeps the tensor alive as long as the view
    return memoryview(buf).cast("B")


def write_tensor(item: PlanItem, root: str, report: Any = None) -> int:
    """Write one tensor into its shard at its offset: fragment bytes copied file to file by the kernel when the
    merge is a plain concatenation in the output dtype, else assembled in memory (TP rule, cast) and pwritten."""
    from ..assemble import copy_runs
    from ..tensor_io import torch_dtype

    assert item.param is not None and item.spec is not None
    path = os.path.join(root, item.outputs[0])
    runs = None
    if all(f.tensor.dtype == item.args["dtype"] for f in item.param.fragments if f.state == item.args["state"]):
        runs = copy_runs(item.param, item.spec, item.args["state"], true_vocab=item.args["true_vocab"])
    if runs is not None:
        length = _copy_runs(runs, path, item.args["offset"])
    else:
        t = assemble_state(item.param, item.spec, item.args["state"], true_vocab=item.args["true_vocab"])
        t = t.to(torch_dtype(item.args["dtype"]))
        if tuple(t.shape) != tuple(item.args["shape"]):
            t = t.reshape(item.args["shape"])
        data = _tensor_bytes(t)
        _pwrite(path, item.args["offset"], data)
        length = len(data)
    os.makedirs(os.path.join(root, DONE_DIR), exist_ok=True)
    with open(_marker(root, item), "w") as fh:
        fh.write(f"{_sample_crc(path, item.args['offset'], length):08x} {length}")
    return length


def _copy_runs(runs: list, path: str, offset: int) -> int:
    """Copy each run's bytes from its source file into `path` (copy_file_range; pread/pwrite where unsupported)."""
    from ..tensor_io import record_offset

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    written = 0
    try:
        for frag, first, count, dst in runs:
            itemsize = frag.tensor.itemsize
            src_off = record_offset(frag.tensor) + (frag.tensor.storage_offset + first) * itemsize
            dst_off = offset + dst * itemsize
            nbytes = count * itemsize
            src = os.open(frag.tensor.file, os.O_RDONLY)
            try:
                done = 0
                while done < nbytes:
                    try:
                        n = os.copy_file_range(src, fd, nbytes - done, src_off + done, dst_off + done)
                    except (AttributeError, OSError):
                        n = 0
                    if n <= 0:  # unsupported here, or end of a truncated source: fall back to a plain copy
                        chunk = os.pread(src, min(nbytes - done, 1 << 24), src_off + done)
                        if not chunk:
                            raise CheckpointError(frag.tensor.file, "file ends inside a tensor (truncated)")
                        n = os.pwrite(fd, chunk, dst_off + done)
                    done += n
            finally:
                os.close(src)
            written += nbytes
    finally:
        os.close(fd)
    return written


SAMPLE = 1 << 16


def _sample_crc(path: str, offset: int, length: int) -> int:
    """CRC of the first and last 64 KiB of a written range: a cheap check that the bytes are still in place."""
    with open(path, "rb") as fh:
        fh.seek(offset)
        head = fh.read(min(length, SAMPLE))
        fh.seek(offset + max(length - SAMPLE, 0))
        tail = fh.read(min(length, SAMPLE))
    return zlib.crc32(tail, zlib.crc32(head))


def tensor_item_complete(item: PlanItem, root: str, *, reread: bool = True) -> bool:
    """A pwritten tensor is complete: its marker exists and (with `reread`) its sampled bytes still match."""
    try:
        with open(_marker(root, item)) as fh:
            crc, length = fh.read().split()
        if int(length) != item.write_bytes:
            return False
        if not reread:
            return True
        return f"{_sample_crc(os.path.join(root, item.outputs[0]), item.args['offset'], int(length)):08x}" == crc
    except (OSError, ValueError):
        return False


def write_torch_shard(item: PlanItem, root: str, report: Any = None) -> int:
    """A pytorch_model*.bin shard: its tensors assembled one by one, then one torch.save."""
    from ..tensor_io import torch_dtype

    out = {}
    for name, src, state, spec in item.args["members"]:
        t = assemble_state(src, spec, state, true_vocab=item.args["true_vocab"])
        out[name] = t.to(torch_dtype(item.args["dtype"])).contiguous()
    return save_atomic(out, os.path.join(root, item.outputs[0]))
