"""Consolidated outputs: safetensors written header-first with each tensor pwritten at its offset; torch .bin shards."""

from __future__ import annotations

import json
import os
import zlib
from typing import Any

from ..assemble import assemble_state
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
    import torch

    t = t.contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def write_tensor(item: PlanItem, root: str, report: Any = None) -> int:
    """Assemble one tensor (merge TP, strip vocabulary padding, cast) and pwrite it into its shard."""
    from ..tensor_io import torch_dtype

    assert item.param is not None and item.spec is not None
    t = assemble_state(item.param, item.spec, item.args["state"], true_vocab=item.args["true_vocab"])
    t = t.to(torch_dtype(item.args["dtype"]))
    if tuple(t.shape) != tuple(item.args["shape"]):
        t = t.reshape(item.args["shape"])
    data = _tensor_bytes(t)
    path = os.path.join(root, item.outputs[0])
    _pwrite(path, item.args["offset"], data)
    os.makedirs(os.path.join(root, DONE_DIR), exist_ok=True)
    with open(_marker(root, item), "w") as fh:
        fh.write(f"{zlib.crc32(data):08x} {len(data)}")
    return len(data)


def tensor_item_complete(item: PlanItem, root: str, *, reread: bool = True) -> bool:
    """A pwritten tensor is complete: its marker exists and (with `reread`) the bytes at its offset still match."""
    try:
        with open(_marker(root, item)) as fh:
            crc, length = fh.read().split()
        if not reread:
            return int(length) == item.write_bytes
        with open(os.path.join(root, item.outputs[0]), "rb") as fh:
            fh.seek(item.args["offset"])
            data = fh.read(int(length))
        return len(data) == int(length) and f"{zlib.crc32(data):08x}" == crc
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
