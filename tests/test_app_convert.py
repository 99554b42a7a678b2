"""Pilot tests of preview → confirm → convert on real fixtures: the plan shown is the engine's, files get written."""

from __future__ import annotations

import os
import threading
import time

import torch
from textual.widgets import DataTable, Input, Static

import engine
from app.main_app import make_app
from app.messages import ExecFinished, ExecProgress, PlanFailed, PlanReady
from app.screens import convert as convert_screen
from app.screens.browse import BrowseScreen
from app.screens.confirm_convert import ConfirmConvertModal
from app.screens.convert import ConvertScreen
from app.screens.preview import PreviewScreen
from app.widgets.run_tree import RunTree
from app.widgets.worker_pane import WorkerPane
from engine.plan import Target, plan_conversion
from engine.progress import EventKind, ProgressEvent

SIZE = (120, 40)
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
EXPECTED_UNIVERSAL = os.path.join(FIXTURES, "deepspeed-0.19.8/z2_fp32_ws2/expected/universal/global_step3_universal")




async def wait_for(pilot, predicate, timeout: float = 120.0) -> None:
    """Pause until `predicate()` holds (conversions run in real processes; no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting for the app"
        await pilot.pause(0.05)


async def type_into(pilot, text: str) -> None:
    """Replace the focused Input's text by keys: end, ctrl+u (delete to the start), then the characters."""
    await pilot.press("end", "ctrl+u", *text)


async def paste_into(pilot, text: str) -> None:
    """Put a long path in the focused Input as a paste would (typing it key by key proves nothing more)."""
    pilot.app.focused.value = text
    await pilot.pause()


async def test_preview_shows_the_engines_plan_and_follows_the_form(ckpt_root, settle):
    messages: list[object] = []
    app = make_app(str(ckpt_root))
    async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
        await settle(pilot)
        await pilot.press("down", "down", "enter")  # megatron global_step10
        await settle(pilot)
        ckpt = app.screen.checkpoint
        await pilot.press("p")
        await settle(pilot)
        screen = app.screen
        assert isinstance(screen, PreviewScreen)
        expected = plan_conversion(ckpt, Target("universal"))
        assert screen.plan is not None and screen.plan == expected
        assert screen.query_one("#plan-table", DataTable).row_count == len(expected.all_items)

        await pilot.press("down", "down", "down", "enter")  # radio set: universal → reshard
        await settle(pilot)
        assert screen.plan is not None and screen.plan.target.kind == "reshard"
        assert (screen.plan.target.tp, screen.plan.target.pp) == (2, 2)  # prefilled with the source degrees

        await pilot.press("tab")  # the tp input (dtype does not apply to a reshard)
        assert app.focused is screen.query_one("#field-tp", Input)
        await type_into(pilot, "1")
        await pilot.press("tab")
        await type_into(pilot, "1")
        await settle(pilot)
        assert screen.plan is not None
        assert screen.plan == plan_conversion(ckpt, Target("reshard", tp=1, pp=1))

        screen.query_one("#field-tp", Input).focus()
        await type_into(pilot, "3")
        await settle(pilot)
        failures = [m for m in messages if isinstance(m, PlanFailed)]
        assert failures and "tp=3" in failures[-1].cause
        summary = screen.query_one("#plan-summary", Static).content
        assert "Cannot plan this target" in str(summary) and screen.plan is None
        ready = [m for m in messages if isinstance(m, PlanReady)]
        assert all(m.plan.target.kind in ("universal", "reshard") for m in ready)


async def test_convert_to_universal_with_two_workers_writes_what_deepspeed_writes(ckpt_root, settle):
    """The full loop by keyboard: preview, confirm (destination under the root), a process pool, rescan."""
    messages: list[object] = []
    app = make_app(str(ckpt_root))
    dst = ckpt_root / "converted"
    async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
        await settle(pilot)  # deepspeed-z2/global_step3 opens by itself
        await pilot.press("p")
        await settle(pilot)
        plan = app.screen.plan
        await pilot.press("c")
        assert isinstance(app.screen, ConfirmConvertModal)
        await paste_into(pilot, str(dst))
        await pilot.press("tab")
        await type_into(pilot, "2")
        await pilot.press("enter")
        await wait_for(pilot, lambda: any(isinstance(m, ExecFinished) for m in messages))
        screen = app.screen
        assert isinstance(screen, ConvertScreen) and screen.outcome == "done"
        result = next(m for m in messages if isinstance(m, ExecFinished)).result
        assert result is not None and result.verified and result.items_done == len(plan.all_items)
        assert sum(pane.items_done for pane in screen.query(WorkerPane)) == len(plan.all_items)
        assert any(m.event.kind == EventKind.ITEM_START and m.event.worker == 1
                   for m in messages if isinstance(m, ExecProgress))  # both pool workers took items

        out = dst / "global_step3_universal"
        assert (dst / "latest_universal").read_text() == "global_step3_universal"
        params = sorted(os.listdir(os.path.join(EXPECTED_UNIVERSAL, "zero")))
        assert sorted(os.listdir(out / "zero")) == params
        for name in params:
            if name == "optimizer_state.pt":
                continue
            for state in ("fp32", "exp_avg", "exp_avg_sq"):
                got = torch.load(out / "zero" / name / f"{state}.pt", weights_only=True)
                want = torch.load(os.path.join(EXPECTED_UNIVERSAL, "zero", name, f"{state}.pt"), weights_only=True)
                assert torch.equal(got["param"], want["param"]), (name, state)

        await pilot.press("escape")  # back to the browser, which rescans and finds the new universal run
        await settle(pilot)
        assert isinstance(app.screen, BrowseScreen)
        roots = [node.data.root for node in app.screen.query_one(RunTree).root.children]
        assert str(dst) in roots
        universal_run = next(r for r in engine.iter_runs(str(dst)))
        assert str(universal_run.format) == "universal"


async def test_cancel_keeps_the_finished_items_and_resume_skips_them(ckpt_root, monkeypatch, settle):
    """One in-process worker; the test holds the run after 3 items until the c key has set the cancel event."""
    real_execute = convert_screen.execute_plan
    held = threading.Event()

    def execute_holding_after_three(plan, dst, *, on_event, cancel, **kwargs):
        def on_event_then_hold(event: ProgressEvent) -> None:
            on_event(event)
            if event.kind == EventKind.ITEM_DONE and event.items_done == 3 and not held.is_set():
                held.set()
                assert cancel.wait(60), "the cancel key never reached the run"

        return real_execute(plan, dst, on_event=on_event_then_hold, cancel=cancel, **kwargs)

    monkeypatch.setattr(convert_screen, "execute_plan", execute_holding_after_three)
    messages: list[object] = []
    app = make_app(str(ckpt_root))
    dst = ckpt_root.parent / "out"
    async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
        await settle(pilot)
        await pilot.press("p")
        await settle(pilot)
        total = len(app.screen.plan.all_items)
        await pilot.press("c")
        await paste_into(pilot, str(dst))
        await pilot.press("tab")
        await type_into(pilot, "1")
        await pilot.press("enter")
        await wait_for(pilot, held.is_set)
        await pilot.press("c")
        await wait_for(pilot, lambda: any(isinstance(m, ExecFinished) for m in messages))
        finished = [m for m in messages if isinstance(m, ExecFinished)]
        assert finished[0].cancelled and app.screen.outcome == "cancelled"
        assert "resume" in str(app.screen.query_one("#convert-summary", Static).content)
        assert not dst.exists() and (dst.parent / ".out.ckpt-explorer-partial").is_dir()

        await pilot.press("escape")  # back on the preview: convert again with resume ticked
        assert isinstance(app.screen, PreviewScreen)
        await pilot.press("c")
        await paste_into(pilot, str(dst))
        await pilot.press("tab")
        await type_into(pilot, "1")
        await pilot.press("tab", "tab", "space")  # workers → overwrite → resume, ticked
        await pilot.press("tab", "enter")  # the Convert button
        await wait_for(pilot, lambda: len([m for m in messages if isinstance(m, ExecFinished)]) == 2)
        result = [m for m in messages if isinstance(m, ExecFinished)][-1].result
        assert result is not None and result.verified
        assert result.items_skipped == 3 and result.items_done == total
        assert (dst / "latest_universal").is_file()


def test_progress_backlog_collapses_per_worker():
    """A newer ITEM_PROGRESS of the same worker replaces a pending one; nothing else is ever dropped."""
    def progress(kind: EventKind, worker: int) -> ExecProgress:
        return ExecProgress(ProgressEvent(kind, worker=worker, item="param:x", bytes_done=1, bytes_total=2), 0.0)

    older = progress(EventKind.ITEM_PROGRESS, 0)
    assert older.can_replace(progress(EventKind.ITEM_PROGRESS, 0))
    assert not older.can_replace(progress(EventKind.ITEM_PROGRESS, 1))
    assert not older.can_replace(progress(EventKind.ITEM_DONE, 0))
    assert not progress(EventKind.ITEM_START, 0).can_replace(progress(EventKind.ITEM_PROGRESS, 0))
