"""Snapshot tests (pytest-textual-snapshot) of every screen, on real fixtures, at a fixed 120×40 terminal.

Deterministic by construction: fixtures are copied under tmp_path/ckpts and the working directory is tmp_path (the
app shows paths relative to it), free disk space is a fixed figure, animations are off (conftest), Input cursors do
not blink, and the progress screen replays a fixed list of engine events instead of timing a real run.
`pytest tests/test_app_snapshots.py --snapshot-update` rewrites the baselines in tests/__snapshots__/.
"""

from __future__ import annotations

import pytest

from app.main_app import make_app
from app.screens.confirm_convert import ConvertRequest
from app.screens.convert import ConvertScreen
from engine.execute import ExecResult
from engine.plan import Plan
from engine.progress import EventKind, ProgressEvent

SIZE = (120, 40)
FREE_DISK = 512 * 2**30


@pytest.fixture
def snap_app(snapshot_root):
    """Builds the app over tmp_path/ckpts, run from tmp_path so every path on screen is short and fixed."""

    def build(root: str = snapshot_root):
        app = make_app(root)
        app.free_disk = lambda path: FREE_DISK
        return app

    return build


def replay_events(plan: Plan) -> list[ProgressEvent]:
    """A fixed run of 2 workers over the first items of a real plan: 3 done, 2 in flight."""
    items = plan.all_items
    total = plan.write_bytes
    events = [ProgressEvent(EventKind.PLAN, overall_total=total, items_total=len(items),
                            message=f"{len(items)} items, 2 workers")]
    done = 0
    for n, item in enumerate(items[:3]):
        events.append(ProgressEvent(EventKind.ITEM_START, worker=n % 2, item=item.id, bytes_total=item.write_bytes))
        done += item.write_bytes
        events.append(ProgressEvent(EventKind.ITEM_DONE, item=item.id, bytes_done=item.write_bytes,
                                    bytes_total=item.write_bytes, overall_done=done, overall_total=total,
                                    items_done=n + 1, items_total=len(items)))
    for worker, item in enumerate(items[3:5]):
        events.append(ProgressEvent(EventKind.ITEM_START, worker=worker, item=item.id, bytes_total=item.write_bytes))
        events.append(ProgressEvent(EventKind.ITEM_PROGRESS, worker=worker, item=item.id,
                                    bytes_done=item.write_bytes // (2 + worker), bytes_total=item.write_bytes))
    return events


class Flows:
    """Keyboard paths through the app shared by the snapshots (each ends with the app settled)."""

    def __init__(self, settle) -> None:
        self.settle = settle

    async def open_megatron(self, pilot) -> None:
        await self.settle(pilot)
        await pilot.press("down", "down", "enter")
        await self.settle(pilot)

    async def open_preview(self, pilot) -> None:
        await self.open_megatron(pilot)
        await pilot.press("p")
        await self.settle(pilot)

    async def keys(self, pilot, *keys: str) -> None:
        await pilot.press(*keys)
        await self.settle(pilot)

    async def replayed_progress(self, pilot, finish: str | None = None) -> None:
        """The convert screen fed a fixed event list (no run started), optionally finished."""
        await self.open_preview(pilot)
        app = pilot.app
        plan = app.screen.plan
        request = ConvertRequest(destination=str(app.root) + "/converted", workers=2, overwrite=False, resume=False)
        screen = ConvertScreen(plan, request, autostart=False)
        await app.push_screen(screen)
        await pilot.pause()
        for step, event in enumerate(replay_events(plan)):
            screen.apply(event, at=step * 0.25)
        if finish == "done":
            result = ExecResult(request.destination, len(plan.all_items), 0, plan.write_bytes + 2131, 3.0, True, "")
            screen.finish(result, cancelled=False)
        elif finish == "cancelled":
            screen.finish(None, cancelled=True)
        await self.settle(pilot)


@pytest.fixture
def flows(settle) -> Flows:
    return Flows(settle)


class TestBrowse:
    def test_browse_megatron_layout(self, snap_app, snap_compare, flows):
        assert snap_compare(snap_app(), terminal_size=SIZE, run_before=flows.open_megatron)

    def test_details_with_statistics(self, snap_app, snap_compare, flows):
        async def run_before(pilot) -> None:
            await flows.open_megatron(pilot)
            await flows.keys(pilot, "tab", "tab", "down", "down", "s")

        assert snap_compare(snap_app(), terminal_size=SIZE, run_before=run_before)

    def test_filter_and_sort_by_size(self, snap_app, snap_compare, flows):
        async def run_before(pilot) -> None:
            await flows.open_megatron(pilot)
            await flows.keys(pilot, "slash", *"weight", "enter", "o", "o")

        assert snap_compare(snap_app(), terminal_size=SIZE, run_before=run_before)


class TestPreview:
    def test_universal_plan(self, snap_app, snap_compare, flows):
        assert snap_compare(snap_app(), terminal_size=SIZE, run_before=flows.open_preview)

    def test_reshard_plan(self, snap_app, snap_compare, flows):
        async def run_before(pilot) -> None:
            await flows.open_preview(pilot)
            await flows.keys(pilot, "down", "down", "down", "enter", "tab", "end", "ctrl+u", "4",
                             "tab", "end", "ctrl+u", "1")

        assert snap_compare(snap_app(), terminal_size=SIZE, run_before=run_before)

    def test_reshard_that_cannot_be_planned(self, snap_app, snap_compare, flows):
        async def run_before(pilot) -> None:
            await flows.open_preview(pilot)
            await flows.keys(pilot, "down", "down", "down", "enter", "tab", "end", "ctrl+u", "3")

        assert snap_compare(snap_app(), terminal_size=SIZE, run_before=run_before)


class TestConvert:
    def test_confirm_modal(self, snap_app, snap_compare, flows):
        async def run_before(pilot) -> None:
            await flows.open_preview(pilot)
            await flows.keys(pilot, "c")

        assert snap_compare(snap_app(), terminal_size=SIZE, run_before=run_before)

    def test_progress(self, snap_app, snap_compare, flows):
        assert snap_compare(snap_app(), terminal_size=SIZE, run_before=flows.replayed_progress)

    def test_done_summary(self, snap_app, snap_compare, flows):
        async def run_before(pilot) -> None:
            await flows.replayed_progress(pilot, finish="done")

        assert snap_compare(snap_app(), terminal_size=SIZE, run_before=run_before)

    def test_cancelled_summary(self, snap_app, snap_compare, flows):
        async def run_before(pilot) -> None:
            await flows.replayed_progress(pilot, finish="cancelled")

        assert snap_compare(snap_app(), terminal_size=SIZE, run_before=run_before)


class TestHelpAndErrors:
    def test_help(self, snap_app, snap_compare, flows):
        async def run_before(pilot) -> None:
            await flows.settle(pilot)
            await flows.keys(pilot, "f1")

        assert snap_compare(snap_app(), terminal_size=SIZE, run_before=run_before)

    def test_error_modal_for_a_missing_root(self, snap_app, snap_compare, flows):
        assert snap_compare(snap_app("/nonexistent/ckpts"), terminal_size=SIZE, run_before=flows.settle)
