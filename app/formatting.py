"""How engine values read on screen: sizes, shapes, rank coordinates, degrees and paths."""

from __future__ import annotations

import os
from collections.abc import Iterable

import humanize

from engine import Checkpoint, Param


def size(nbytes: int | float) -> str:
    """A byte count the way the whole app writes it: binary units, e.g. '250.0 MiB'."""
    return humanize.naturalsize(nbytes, binary=True)


def shape(dims: Iterable[int] | None) -> str:
    """A tensor shape as '4096×1024' ('scalar' for a 0-d tensor, '-' when unknown)."""
    if dims is None:
        return "-"
    dims = tuple(dims)
    return "×".join(str(d) for d in dims) if dims else "scalar"


def shard_shape(param: Param) -> str:
    """The shape one rank holds: one shape when every rank holds the same, else each distinct one."""
    distinct = list(dict.fromkeys(s.shape for s in param.shards))
    if not distinct:
        return shape(param.shape)
    return " | ".join(shape(s) for s in distinct)


def degrees_text(ckpt: Checkpoint) -> str:
    """'tp 2 × pp 2 × dp 1' (plus 'ep N' when experts are parallel)."""
    deg = ckpt.degrees
    text = f"tp {deg.tp} × pp {deg.pp} × dp {deg.dp}"
    return text + (f" × ep {deg.ep}" if deg.ep > 1 else "")


def zero_text(ckpt: Checkpoint) -> str:
    return "no ZeRO" if ckpt.zero_stage is None else f"ZeRO-{ckpt.zero_stage}"


def rel_path(path: str, root: str) -> str:
    """`path` relative to the explored root (the root itself reads as its own name)."""
    path, root = os.path.abspath(path), os.path.abspath(root)
    if path == root:
        return os.path.basename(root) or root
    try:
        rel = os.path.relpath(path, root)
    except ValueError:
        return path
    return path if rel.startswith("..") else rel


def display_path(path: str) -> str:
    """A path as a shell user would type it: relative to the working directory when under it, else absolute."""
    path = os.path.abspath(path)
    cwd = os.getcwd()
    if path == cwd:
        return "."
    if path.startswith(cwd.rstrip(os.sep) + os.sep):
        return os.path.relpath(path, cwd)
    home = os.path.expanduser("~")
    if home not in ("", "/") and path.startswith(home.rstrip(os.sep) + os.sep):
        return "~" + path[len(home.rstrip(os.sep)):]
    return path


def rate(nbytes: float, seconds: float) -> str:
    return f"{size(nbytes / seconds)}/s" if seconds > 0 else "-"


def duration(seconds: float) -> str:
    """A short duration: '42 s', '3 min 05 s', '2 h 07 min'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def middle_truncate(text: str, width: int) -> str:
    """Shorten `text` to `width` characters by eliding its middle (names differ at both ends)."""
    if len(text) <= width:
        return text
    keep = width - 1
    head = keep // 3
    return text[:head] + "…" + text[len(text) - (keep - head):]


def shorten_names(names: list[str], width: int) -> list[str]:
    """Fit names into `width`: first drop the suffix they all share (file names differ in the middle), then elide."""
    if all(len(n) <= width for n in names):
        return list(names)
    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1] if len(names) > 1 else ""
    if len(suffix) >= 4 and all(len(n) > len(suffix) for n in names):
        names = [n[: len(n) - len(suffix)] + "…" for n in names]
    return [middle_truncate(n, width) for n in names]
