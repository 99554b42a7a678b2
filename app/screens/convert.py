"""The convert screen: runs the plan in a thread worker and shows overall, per-worker and logged progress."""

from __future__ import annotations

import gc
import threading
import time

from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Vertical
from textual.widgets import Footer, Header, ProgressBar, RichLog, Static
from textual.worker import Worker

from engine.execute import Cancelled, ExecResult, execute_plan, partial_dir
from engine.plan import Plan
from engine.progress import EventKind, ProgressEvent

from ..formatting import display_path, duration, rate, size
from ..messages import ExecFinished, ExecProgress
from ..widgets.worker_pane import WorkerPane
from .base import ExplorerScreen
from .confirm_convert import ConvertRequest
from .error_modal import one_line_cause

MAX_WORKER_PANES = 16


class ConvertScreen(ExplorerScreen):
    """Live progress of one conversion; cancel keeps the partial output for a resumed run."""

    BINDINGS = [
        Binding("c", "cancel", "Cancel", tooltip="Stop after the items in flight (resumable)", id="convert.cancel"),
        Binding("escape", "back", "Back", tooltip="Back to the browser (when finished)", id="convert.back"),
    ]

    def __init__(self, plan: Plan, request: ConvertRequest, *, autostart: bool = True) -> None:
        super().__init__()
        self.plan = plan
        self.request = request
        self.autostart = autostart
        self.cancel_event = threading.Event()
        self.finished = False
        self.outcome: str | None = None  # "done" | "cancelled" | "failed"
        self.done_bytes = 0
        self.total_bytes = plan.write_bytes
        self.items_done = 0
        self.items_total = len(plan.all_items)
        self.started_at: float | None = None
        self.last_at: float | None = None
        self._in_flight: dict[int, int] = {}  # worker -> bytes done of its current item
        self._item_worker: dict[str, int] = {}
        self._finished_items: set[str] = set()  # the pool's ITEM_DONE can overtake that item's START/PROGRESS

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with Vertical(id="convert"):
            yield Static(
                Text.assemble((self.plan.target.describe(), "bold"),
                              ("\nfrom ", "dim"), display_path(self.plan.source_path),
                              ("\nto   ", "dim"), display_path(self.request.destination)),
                id="convert-title",
            )
            yield ProgressBar(total=max(1, self.total_bytes), show_eta=False, id="overall-bar")
            yield Static("starting…", id="overall-stats")
            with Grid(id="worker-panes") as grid:
                grid.styles.grid_size_columns = min(4, max(1, self.request.workers))
                for index in range(min(self.request.workers, MAX_WORKER_PANES)):
                    yield WorkerPane(index, id=f"worker-{index}")
            yield RichLog(id="convert-log", max_lines=2000, markup=False, wrap=False)
            yield Static("", id="convert-summary")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "converting"
        # Few garbage-collection passes while the progress panes repaint: a full pass over Textual's render caches
        # stalls the loop for 100-500 ms (bench/bench_app.py). The usual thresholds return when the run ends.
        global _saved_thresholds
        if _saved_thresholds is None:
            _saved_thresholds = gc.get_threshold()
            gc.freeze()  # what exists now is never scanned again during the run (no collection here: that stalls)
            gc.set_threshold(10_000, 100, 1_000)  # young collections stay cheap; full passes become rare
        if self.autostart:
            self.run_conversion()

    # --- the run -------------------------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="convert", exit_on_error=False, description="The conversion")
    def run_conversion(self) -> None:
        def on_event(event: ProgressEvent) -> None:
            self.post_message(ExecProgress(event, time.monotonic()))

        try:
            result = execute_plan(
                self.plan, self.request.destination, workers=self.request.workers,
                overwrite=self.request.overwrite, resume=self.request.resume,
                on_event=on_event, cancel=self.cancel_event,
            )
        except Cancelled:
            self.post_message(ExecFinished(None, cancelled=True))
            return
        self.post_message(ExecFinished(result, cancelled=False))

    @on(ExecProgress)
    def _progress(self, message: ExecProgress) -> None:
        self.apply(message.event, message.at)

    def apply(self, event: ProgressEvent, at: float) -> None:
        """Fold one engine event into the screen (also used to replay recorded events)."""
        if self.started_at is None:
            self.started_at = at
        self.last_at = at
        log = self.query_one(RichLog)
        kind = event.kind
        if kind == EventKind.PLAN:
            self.total_bytes = event.overall_total or self.total_bytes
            self.items_total = event.items_total or self.items_total
            log.write(f"plan: {event.message}")
        elif kind == EventKind.ITEM_START and event.worker is not None and event.item:
            pane = self._pane(event.worker)
            if event.item in self._finished_items:  # its DONE came first: credit the worker, stay idle
                if pane is not None:
                    pane.start(event.item, event.bytes_total)
                    pane.finish()
            else:
                self._item_worker[event.item] = event.worker
                self._in_flight[event.worker] = 0
                if pane is not None:
                    pane.start(event.item, event.bytes_total)
        elif kind == EventKind.ITEM_PROGRESS and event.worker is not None:
            if event.item not in self._finished_items and self._item_worker.get(event.item or "") == event.worker:
                self._in_flight[event.worker] = event.bytes_done
                pane = self._pane(event.worker)
                if pane is not None:
                    pane.advance(event.bytes_done, event.bytes_total)
        elif kind in (EventKind.ITEM_DONE, EventKind.ITEM_SKIPPED):
            self.done_bytes = event.overall_done
            self.items_done = event.items_done
            if event.item:
                self._finished_items.add(event.item)
            worker = self._item_worker.pop(event.item or "", None)
            if worker is not None:
                self._in_flight.pop(worker, None)
                pane = self._pane(worker)
                if pane is not None:
                    pane.finish()
            name = (event.item or "").split(":", 1)[-1]
            if kind == EventKind.ITEM_SKIPPED:
                log.write(f"skipped, already complete: {name}")
            else:
                log.write(f"✓ {name} ({size(event.bytes_done)})")
        elif kind == EventKind.LOG:
            log.write(event.message)
        elif kind == EventKind.DONE:
            self.done_bytes, self.items_done = event.overall_total, event.items_total
            log.write("done; outputs verified")
        elif kind == EventKind.CANCELLED:
            log.write(f"cancelled: {event.message}")
        elif kind == EventKind.ERROR:
            log.write(f"error: {event.message}")
        self._show_overall()

    def _pane(self, worker: int) -> WorkerPane | None:
        if worker >= MAX_WORKER_PANES:
            return None
        try:
            return self.query_one(f"#worker-{worker}", WorkerPane)
        except Exception:
            return None

    def _show_overall(self) -> None:
        done = self.done_bytes + sum(self._in_flight.values())
        done = min(done, self.total_bytes)
        self.query_one("#overall-bar", ProgressBar).update(total=max(1, self.total_bytes), progress=done)
        elapsed = (self.last_at or 0.0) - (self.started_at or 0.0)
        parts = [f"{size(done)} of {size(self.total_bytes)}", f"{self.items_done} of {self.items_total} items"]
        if elapsed > 0 and done > 0 and not self.finished:
            speed = done / elapsed
            parts.append(rate(done, elapsed))
            parts.append(f"ETA {duration((self.total_bytes - done) / speed)}")
        self.query_one("#overall-stats", Static).update(" · ".join(parts))

    @on(ExecFinished)
    def _finished(self, message: ExecFinished) -> None:
        self.finish(message.result, cancelled=message.cancelled)

    def finish(self, result: ExecResult | None, *, cancelled: bool) -> None:
        self.finished = True
        _resume_gc()
        summary = self.query_one("#convert-summary", Static)
        if cancelled or result is None:
            self.outcome = "cancelled"
            self.sub_title = "cancelled"
            partial = display_path(partial_dir(self.request.destination))
            summary.update(Text.assemble(
                ("Cancelled. ", "bold yellow"),
                f"{self.items_done} of {self.items_total} items are done and kept in {partial}. ",
                "Convert again to the same destination with ", ("resume", "bold"), " ticked to finish the rest.",
            ))
        else:
            self.outcome = "done"
            self.sub_title = "done"
            self.done_bytes, self.items_done = self.total_bytes, self.items_total
            for pane in self.query(WorkerPane):
                pane.idle()
            verified = Text("verified ✓", "bold green") if result.verified else Text("NOT verified ✗", "bold red")
            summary.update(Text.assemble(
                ("Done. ", "bold green"),
                f"{result.items_done} items ({result.items_skipped} resumed) · {size(result.bytes_written)} written "
                f"to {display_path(result.dst)} in {duration(result.seconds)} · ", verified,
                ("   esc: back to the browser", "dim"),
            ))
        self._show_overall()
        self.refresh_bindings()

    def worker_failed(self, worker: Worker) -> None:
        if worker.group != "convert" or worker.error is None:
            return
        self.finished = True
        self.outcome = "failed"
        self.sub_title = "failed"
        self.query_one("#convert-summary", Static).update(
            Text.assemble(("Failed: ", "bold red"), one_line_cause(worker.error), (" (no partial output kept)", "dim"))
        )
        self.refresh_bindings()

    # --- actions -------------------------------------------------------------------------------------------------

    def action_cancel(self) -> None:
        if self.finished or self.cancel_event.is_set():
            return
        self.cancel_event.set()
        self.sub_title = "cancelling…"
        self.query_one(RichLog).write("cancel requested: finishing the items in flight…")

    def action_back(self) -> None:
        if not self.finished:
            self.notify("Still converting: press c to cancel first.", severity="warning")
            return
        self.dismiss(self.outcome == "done")

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "cancel":
            return None if self.finished else True
        if action == "back":
            return True if self.finished else None
        return True

    def on_unmount(self) -> None:
        self.cancel_event.set()  # leaving the app mid-run stops the pool cleanly
        _resume_gc()


_saved_thresholds: tuple[int, int, int] | None = None


def _resume_gc() -> None:
    """The usual collection thresholds back after a run (idempotent)."""
    global _saved_thresholds
    if _saved_thresholds is not None:
        gc.set_threshold(*_saved_thresholds)
        gc.unfreeze()
        _saved_thresholds = None
