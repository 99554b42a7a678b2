"""What the preview form's fields mean: parsing them into an engine Target, and the default destination."""

from __future__ import annotations

import os
import re
import shutil

from engine import Checkpoint
from engine.plan import Target

SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
              "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
DEFAULT_MAX_SHARD = "5GB"


def parse_size(text: str) -> int:
    """'5GB', '500MiB', '1e9' → bytes; raises ValueError with a readable message."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"not a size: {text!r} (try 5GB or 500MiB)")
    value = float(match.group(1)) * SIZE_UNITS[match.group(2).lower()]
    if value < 1:
        raise ValueError(f"size must be positive: {text!r}")
    return int(value)


def parse_degree(text: str, name: str) -> int | None:
    """An optional positive integer (empty = keep the source's degree)."""
    text = text.strip()
    if not text:
        return None
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{name} must be a positive integer, not {text!r}")
    return int(text)


def make_target(kind: str, *, dtype: str | None, tp: str, pp: str, quantize: str | None, groups: str,
                max_shard_size: str, strict: bool) -> Target:
    """The Target the form describes; fields that do not apply to `kind` are left at their defaults."""
    if kind == "universal":
        return Target("universal", strict=strict)
    if kind in ("safetensors", "torch"):
        return Target(kind, dtype=dtype, max_shard_size=parse_size(max_shard_size or DEFAULT_MAX_SHARD), strict=strict)
    return Target("reshard", dtype=dtype, tp=parse_degree(tp, "tp"), pp=parse_degree(pp, "pp"), quantize=quantize,
                  groups=parse_degree(groups, "groups") or 64, strict=strict)


def default_destination(ckpt: Checkpoint, target: Target) -> str:
    """A sibling of the run directory named after the iteration and the target, e.g. ckpt_global_step10_universal."""
    run_root = os.path.abspath(ckpt.run_root)
    suffix = target.kind if target.kind != "reshard" else f"tp{target.tp or 'same'}_pp{target.pp or 'same'}"
    return os.path.join(os.path.dirname(run_root), f"{os.path.basename(run_root)}_{ckpt.tag}_{suffix}")


def free_disk(path: str) -> int:
    """Free bytes on the filesystem that will hold `path` (its nearest existing ancestor)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    return shutil.disk_usage(probe).free
