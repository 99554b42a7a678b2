"""Find every checkpoint run under a root directory by listing directories only (no file is opened)."""

from __future__ import annotations

import os
from collections.abc import Iterator

from .errors import CheckpointError
from .formats.base import DirListing, format_for, registered_formats
from .layout import Checkpoint, IterationRef, Run

MAX_DEPTH = 12


def iter_runs(root: str, *, max_depth: int = MAX_DEPTH) -> Iterator[Run]:
    """Yield runs as they are found, breadth-first, so a UI can show the first ones at once."""
    root = os.path.abspath(root)
    if not os.path.exists(root):
        raise CheckpointError(root, "no such file or directory")
    formats = registered_formats()
    if os.path.isfile(root):
        listing = DirListing(os.path.dirname(root), (os.path.basename(root),), ())
        for fmt in formats:
            run = fmt.claim_run(listing)
            if run is not None:
                yield run
                return
        raise CheckpointError(root, "not a checkpoint file this tool knows")
    queue: list[tuple[str, int]] = [(root, 0)]
    seen: set[tuple[int, int]] = set()
    while queue:
        path, depth = queue.pop(0)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        listing = DirListing.of(path)
        owned: set[str] = set()
        for fmt in formats:
            run = fmt.claim_run(listing)
            if run is not None:
                yield run
                owned = {os.path.abspath(it.path) for it in run.iterations}
                break
        if depth >= max_depth:
            continue
        for name in listing.dirs:
            if name.startswith(".") or name in ("__pycache__", "node_modules"):
                continue
            sub = os.path.join(path, name)
            if sub in owned:
                continue
            queue.append((sub, depth + 1))


def discover(root: str, *, max_depth: int = MAX_DEPTH) -> list[Run]:
    """Every run under `root` (a directory or a single checkpoint file)."""
    return list(iter_runs(root, max_depth=max_depth))


def read_checkpoint(ref: IterationRef) -> Checkpoint:
    """Read one iteration's full layout (metadata only) with its family's reader."""
    return format_for(ref.format).read(ref)


def pick_iteration(run: Run, iteration: int | None = None, tag: str | None = None) -> IterationRef:
    """The iteration a user means: by tag, by number, else the one `latest` names, else the newest."""
    if tag is not None:
        for it in run.iterations:
            if it.tag == tag:
                return it
        have = ", ".join(i.tag for i in run.iterations)
        raise CheckpointError(run.root, f"no iteration tagged {tag!r} (have: {have})")
    if iteration is not None:
        for it in run.iterations:
            if it.iteration == iteration:
                return it
        raise CheckpointError(run.root, f"no iteration {iteration}")
    for it in run.iterations:
        if it.latest:
            return it
    if not run.iterations:
        raise CheckpointError(run.root, "run has no iterations")
    return max(run.iterations, key=lambda it: (it.iteration if it.iteration is not None else -1, it.tag))
