"""Structural checks of written outputs: each file is complete and parses (no tensor bytes are re-read)."""

from __future__ import annotations

import json
import os
import struct

from .errors import CheckpointError
from .plan import PlanItem
from .torchzip import TorchZip


def verify_file(path: str) -> str | None:
    """None when `path` is a complete output file, else the one-line problem."""
    if not os.path.isfile(path):
        return f"{path}: missing"
    if path.endswith((".pt", ".bin")):
        try:
            TorchZip(path).pickle_bytes()
        except CheckpointError as exc:
            return str(exc)
    elif path.endswith(".safetensors"):
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                return f"{path}: truncated safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                return f"{path}: safetensors header longer than the file"
            try:
                header = json.loads(fh.read(n))
            except ValueError:
                return f"{path}: safetensors header is not JSON"
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            return f"{path}: {size} bytes but the header describes {8 + n + end}"
    return None


def verify_output(item: PlanItem, root: str, *, deep: bool = True) -> str | None:
    """None when every output of `item` under `root` is complete (`deep`: re-read pwritten bytes and check CRCs)."""
    if item.kind == "tensor":
        from .writers.consolidated import tensor_item_complete

        if not tensor_item_complete(item, root, reread=deep):
            return f"{item.outputs[0]}: bytes of {item.name} missing or changed"
        return None
    if item.kind == "safetensors_header":
        return None if os.path.isfile(os.path.join(root, item.outputs[0])) else f"{item.outputs[0]}: missing"
    for rel in item.outputs:
        problem = verify_file(os.path.join(root, rel))
        if problem:
            return problem
    return None
