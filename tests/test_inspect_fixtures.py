"""`inspect --json` on every real fixture: degrees, stage, dtype and every (name, global shape) as expected."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from fixture_paths import FIXTURES, case_dirs, expected

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _inspect(path: str) -> dict:
    import contextlib
    import io

    from app.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["inspect", path, "--json"])
    assert rc == 0, buf.getvalue()
    return json.loads(buf.getvalue())


@pytest.mark.parametrize("case", case_dirs())
def test_inspect_matches_expected(case: str) -> None:
    exp = expected(case)
    root = os.path.join(FIXTURES, case, "ckpt")
    doc = _inspect(root)
    mine = [c for c in doc["checkpoints"] if os.path.abspath(c["run"]).startswith(os.path.abspath(root))]
    assert mine, f"no checkpoint found under {root}"
    latest = [c for c in mine if c["latest"]] or mine
    ck = max(latest, key=lambda c: c["iteration"] or 0)
    assert ck["iteration"] == exp["iteration"]
    for key in ("tp", "pp", "dp", "zero_stage"):
        if key in exp:
            assert ck[key] == exp[key], key
    if exp.get("dtype") in DTYPES and ck["format"] == "deepspeed":
        assert ck["dtype"] == DTYPES[exp["dtype"]]
    got = {p["name"]: p["shape"] for p in ck["params"]}
    assert got == exp["params"]
    for alias, source in (exp.get("tied") or {}).items():
        assert next(p for p in ck["params"] if p["name"] == alias)["tied_to"] == source
    for key in ("path", "format", "iteration", "latest", "zero_stage", "dtype", "tp", "pp", "dp", "params"):
        assert key in ck


def test_inspect_whole_tree_reads_every_family() -> None:
    doc = _inspect(FIXTURES)
    formats = {c["format"] for c in doc["checkpoints"]}
    assert {"deepspeed", "universal", "megatron", "torch_dist"} <= formats
    assert not doc["errors"]


def test_inspect_reads_no_tensor_bytes() -> None:
    """Metadata only: bytes read stay a small fraction of the checkpoint (and torch is never imported)."""
    code = (
        "import sys, engine\n"
        "run = engine.discover(sys.argv[1])[0]\n"
        "ck = engine.read_checkpoint(engine.pick_iteration(run))\n"
        "print(ck.meta['bytes_read'], ck.total_bytes, 'torch' in sys.modules)\n"
    )
    root = os.path.join(FIXTURES, "megatron-deepspeed", "gpt_pipe_tp2_pp2_dp1_bf16", "ckpt")
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
    bytes_read, total, torch_loaded = int(out[0]), int(out[1]), out[2]
    assert bytes_read < total * 0.05
    assert torch_loaded == "False"


def test_inspect_missing_path_is_a_one_line_error(tmp_path, capsys) -> None:
    from app.cli import main

    assert main(["inspect", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope" in err[0] and "no such file" in err[0]
