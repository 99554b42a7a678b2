"""Where the copied real checkpoints live, and the cases they hold (tests/fixtures mirrors ../shared/fixtures)."""

from __future__ import annotations

import glob
import json
import os

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def case_dirs() -> list[str]:
    """Every fixture case with an `expected.json` and a `ckpt/` root, relative to FIXTURES."""
    out = []
    for path in sorted(glob.glob(os.path.join(FIXTURES, "*", "*", "expected.json"))):
        case = os.path.dirname(path)
        if os.path.isdir(os.path.join(case, "ckpt")):
            out.append(os.path.relpath(case, FIXTURES))
    return out


def expected(case: str) -> dict:
    with open(os.path.join(FIXTURES, case, "expected.json")) as fh:
        return json.load(fh)


def universal_cases() -> list[str]:
    return [c for c in case_dirs()
            if os.path.exists(os.path.join(FIXTURES, c, "expected", "universal", "latest_universal"))]


def reference_cases() -> list[str]:
    return [c for c in case_dirs() if os.path.exists(os.path.join(FIXTURES, c, "reference_fp32.pt"))]


def assert_reads_without_torch(path: str) -> None:
    """Reading every checkpoint under `path` from metadata must not import torch (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys; from engine.discover import discover, read_checkpoint\n"
        f"for run in discover({str(path)!r}):\n"
        "    [read_checkpoint(it) for it in run.iterations]\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
