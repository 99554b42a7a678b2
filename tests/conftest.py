"""Shared pytest setup: a steady Textual (no animations) and a resource tracker started before any app runs."""

from __future__ import annotations

import asyncio
import inspect
import multiprocessing.resource_tracker
import os

import pytest

# Read by Textual when it is first imported: snapshot tests need a screen without animations in flight.
os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")
# Tiny tensors: one intra-op thread is fastest and keeps runtimes independent of machine load.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker_running() -> None:
    """Process pools started inside a running Textual app need the tracker started while stderr is a real file."""
    multiprocessing.resource_tracker.ensure_running()


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run `async def` tests (the app's pilot tests) in a fresh event loop; no asyncio plugin needed."""
    if not inspect.iscoroutinefunction(pyfuncitem.obj):
        return None
    kwargs = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(pyfuncitem.obj(**kwargs))
    return True


# --- app tests: real fixture checkpoints copied under one root ----------------------------------------------------

APP_FIXTURES = {
    "deepspeed-z2": "deepspeed-0.19.8/z2_fp32_ws2/ckpt",
    "megatron-tp2-pp2": "megatron-deepspeed/gpt_pipe_tp2_pp2_dp1_bf16/ckpt",
}


def copy_checkpoints(root, names=tuple(APP_FIXTURES)):
    """Copy fixture checkpoints to `root/<name>` (writable copies; DeepSpeed's zero_to_*.py scripts left out)."""
    import shutil
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures"
    root = Path(root)
    for name in names:
        shutil.copytree(fixtures / APP_FIXTURES[name], root / name, copy_function=shutil.copyfile,
                        ignore=shutil.ignore_patterns("zero_to_*.py"))
    return root


@pytest.fixture
def ckpt_root(tmp_path):
    """tmp_path/ckpts holding the z2 fp32 DeepSpeed run and the tp2×pp2 Megatron-DeepSpeed run."""
    return copy_checkpoints(tmp_path / "ckpts")


@pytest.fixture
def snapshot_root(tmp_path, monkeypatch):
    """tmp_path/ckpts as above, with tmp_path as the working directory (the app then shows paths as 'ckpts/...')."""
    copy_checkpoints(tmp_path / "ckpts")
    monkeypatch.chdir(tmp_path)
    return "ckpts"


async def _settle(pilot) -> None:
    """Wait until the app is idle: screens mounted, every worker finished, every posted message handled.

    A key press can push a screen whose on_mount starts a worker only after the press returns, so one
    `wait_for_complete` is not enough; a worker that failed is the app's to report (tests look at the modal).
    """
    from textual.widgets import Input
    from textual.worker import WorkerFailed

    app = pilot.app
    for _ in range(200):
        await pilot.pause()
        if all(worker.is_finished for worker in app.workers):
            await pilot.pause()
            if all(worker.is_finished for worker in app.workers):
                break
        try:
            await app.workers.wait_for_complete()
        except WorkerFailed:
            pass
    for widget in app.screen.query(Input):
        widget.cursor_blink = False  # a blinking cursor would make screenshots differ
    await pilot.pause()


@pytest.fixture
def settle():
    """`await settle(pilot)`: the app's workers are done and their messages handled (no sleeps)."""
    return _settle
