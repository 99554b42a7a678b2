"""Temporary names for atomic writes (write, then rename) and the sweep that removes ones a killed worker left."""

from __future__ import annotations

import os
import re
import secrets
import socket

TEMP_MARK = ".ckpt-explorer-tmp-"
_TEMP_RE = re.compile(re.escape(TEMP_MARK) + r"[A-Za-z0-9_.-]+$")


def temp_path(path: str) -> str:
    """A unique sibling of `path` to write before renaming onto it (unique across hosts and processes)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32]
    return f"{path}{TEMP_MARK}{host}-{os.getpid()}-{secrets.token_hex(3)}"


def sweep_temporaries(root: str) -> int:
    """Remove temporaries left under `root` by interrupted writes; returns how many were removed."""
    removed = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            if _TEMP_RE.search(name):
                try:
                    os.remove(os.path.join(dirpath, name))
                    removed += 1
                except OSError:
                    pass
    return removed
