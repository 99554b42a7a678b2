"""Interop: real DeepSpeed loads OUR universal output (load_universal) and restores the exact fp32 masters and moments.

Each case converts a real fixture (written by DeepSpeed 0.19.8) with our universal converter, then runs real
DeepSpeed under torchrun (gloo, CPU accelerator) at a new world size / ZeRO stage with
`"checkpoint": {"load_universal": true}` (tests/interop/load_universal.py), and compares what it restored:
fp32 masters with the fixture's reference_fp32.pt, exp_avg / exp_avg_sq with the moments our converter wrote and
with those DeepSpeed's own ds_to_universal wrote for the fixture (torch.equal, bit for bit), the module weights
with the masters in the model dtype, and the step counters with the source iteration.

Opt-in: marked `interop`; skipped unless DeepSpeed is importable from the interpreter named by
CKPT_EXPLORER_DS_PYTHON or from this one (make one with .ci/install_deepspeed.sh).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.interop

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "deepspeed-0.19.8"
LOADER = HERE / "interop" / "load_universal.py"
STATES = ("exp_avg", "exp_avg_sq")


def _ds_python() -> str | None:
    """The interpreter that has DeepSpeed, or None."""
    candidates = [os.environ.get("CKPT_EXPLORER_DS_PYTHON") or "", sys.executable]
    for py in candidates:
        if not py or (shutil.which(py) is None and not os.path.isfile(py)):
            continue
        probe = subprocess.run([py, "-c", "import importlib.util, sys; "
                                "sys.exit(importlib.util.find_spec('deepspeed') is None)"], capture_output=True)
        if probe.returncode == 0:
            return py
    return None


@pytest.fixture(scope="module")
def ds_python() -> str:
    py = _ds_python()
    if py is None:
        pytest.skip("DeepSpeed not importable (set CKPT_EXPLORER_DS_PYTHON; see .ci/install_deepspeed.sh)")
    return py


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Our universal conversion of each source fixture, made once per module."""
    from engine import discover, pick_iteration, read_checkpoint
    from engine.execute import execute_plan
    from engine.plan import Target, plan_conversion

    out: dict[str, Path] = {}
    root = tmp_path_factory.mktemp("universal")
    for case in ("z2_fp32_ws2", "z1_bf16_ws2", "z3_fp32_ws2"):
        runs = discover(str(FIXTURES / case / "ckpt"))
        ckpt = read_checkpoint(pick_iteration(runs[0]))
        dst = root / case
        execute_plan(plan_conversion(ckpt, Target("universal")), str(dst), workers=1)
        out[case] = dst
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_with_deepspeed(py: str, load_dir: Path, dump: Path, *, world: int, stage: int, dtype: str) -> dict:
    import torch

    env = dict(os.environ, DS_ACCELERATOR="cpu", DS_BUILD_OPS="0", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    cmd = [py, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port", str(_free_port()),
           str(LOADER), "--load-dir", str(load_dir), "--zero-stage", str(stage), "--dtype", dtype,
           "--hidden", "64", "--layers", "4", "--dump", str(dump)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"DeepSpeed load failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    return torch.load(dump, weights_only=True)


def _load_state(path: Path):  # noqa: ANN202 - torch is imported lazily
    """A universal state file: {'param': T, ...} or a bare (ZeRO-3: flat) tensor."""
    import torch

    obj = torch.load(path, weights_only=True)
    return obj["param"] if isinstance(obj, dict) else obj


CASES = [
    # (source fixture, ZeRO stage at load, model dtype at load, world size at load)
    ("z2_fp32_ws2", 2, "fp32", 1),
    ("z2_fp32_ws2", 2, "fp32", 4),
    ("z1_bf16_ws2", 2, "bf16", 1),
    ("z3_fp32_ws2", 3, "fp32", 1),
]


@pytest.mark.parametrize("case,stage,dtype,world", CASES, ids=[f"{c}-to-z{s}_{d}_ws{w}" for c, s, d, w in CASES])
def test_deepspeed_loads_our_universal(ds_python: str, converted: dict[str, Path], tmp_path: Path,
                                       case: str, stage: int, dtype: str, world: int) -> None:
    import torch

    src = FIXTURES / case
    reference = torch.load(src / "reference_fp32.pt", weights_only=True)
    out = converted[case]
    tag = (out / "latest_universal").read_text().strip()
    got = _load_with_deepspeed(ds_python, out, tmp_path / "dump.pt", world=world, stage=stage, dtype=dtype)

    assert got["world"] == world
    assert sorted(got["fp32"]) == sorted(reference)
    model_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    for name, ref in reference.items():
        assert got["fp32"][name] is not None, f"{name}: DeepSpeed restored no fp32 master"
        assert torch.equal(got["fp32"][name], ref), f"{name}: fp32 master differs from reference_fp32.pt"
        assert torch.equal(got["lp"][name], ref.to(model_dtype)), f"{name}: module weight is not the master"
        for state in STATES:
            assert got[state][name] is not None, f"{name}: DeepSpeed restored no {state}"
            ours = _load_state(out / tag / "zero" / name / f"{state}.pt")
            assert torch.equal(got[state][name], ours.reshape(ref.shape)), f"{name}: {state} differs from ours"
            # independent oracle: what DeepSpeed's own ds_to_universal wrote for this fixture
            theirs = _load_state(src / "expected" / "universal" / tag / "zero" / name / f"{state}.pt")
            assert torch.equal(got[state][name], theirs.reshape(ref.shape)), f"{name}: {state} != ds_to_universal's"
            assert got[state][name].abs().sum() > 0, f"{name}: {state} is all zeros (not restored)"
    iteration = int(tag.removeprefix("global_step").removesuffix("_universal"))
    assert got["global_steps"] == iteration
    assert got["steps"] and all(s == iteration for s in got["steps"]), got["steps"]
