"""Bundled demo checkpoints (small real DeepSpeed / Megatron-DeepSpeed fixtures) and a writable copy of them."""

from __future__ import annotations

import os
import shutil
import tempfile

CHECKPOINTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "checkpoints")


def prepare_demo() -> str:
    """Copy the bundled checkpoints to a fresh temporary directory (writable, so conversions can land there)."""
    root = tempfile.mkdtemp(prefix="ckpt-explorer-demo-")
    for name in sorted(os.listdir(CHECKPOINTS)):
        src = os.path.join(CHECKPOINTS, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(root, name), copy_function=shutil.copyfile)
    return root
