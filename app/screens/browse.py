"""The browse screen: run tree, layout panel, parameter list and details of the highlighted parameter."""

from __future__ import annotations

import time

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Footer, Header, Static, Tree
from textual.worker import Worker, get_current_worker

import engine
from engine import Checkpoint, IterationRef, Param
from engine.stats import ParamStats, param_stats

from ..formatting import display_path, rel_path
from ..messages import CheckpointLoaded, RunsFound, ScanFinished, StatsComputed
from ..widgets.layout_panel import LayoutPanel
from ..widgets.param_browser import ParamBrowser
from ..widgets.param_details import ParamDetails
from ..widgets.run_tree import RunTree
from .base import ExplorerScreen

SCAN_BATCH_SECONDS = 0.1


def compute_param_stats(param: Param) -> ParamStats:
    """Statistics of one parameter (reads its bytes: call it from a thread worker)."""
    return param_stats(param)


class BrowseScreen(ExplorerScreen):
    """Everything starts here: the root is scanned in the background and runs appear as they are found."""

    BINDINGS = [
        Binding("slash", "focus_filter", "Filter", tooltip="Type to filter parameters by name", id="browse.filter"),
        Binding("o", "sort_next", "Sort", tooltip="Sort parameters by the next column", id="browse.sort"),
        Binding("O", "sort_reverse", "Reverse", show=False, tooltip="Reverse the sort order", id="browse.reverse"),
        Binding("s", "stats", "Stats", tooltip="Compute statistics of the highlighted parameter", id="browse.stats"),
        Binding("p", "preview", "Preview/convert", tooltip="Plan a conversion of this iteration", id="browse.preview"),
        Binding("r", "rescan", "Rescan", tooltip="Scan the root directory again", id="browse.rescan"),
        Binding("escape", "leave_filter", "Back", show=False, tooltip="Leave the filter box", id="browse.leave_filter"),
    ]

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root
        self.checkpoint: Checkpoint | None = None
        self._auto_opened = False

    def compose(self) -> ComposeResult:
        yield Header(icon="◆")
        with Horizontal(id="browse"):
            yield RunTree(self.root, id="run-tree")
            with Vertical(id="browse-right"):
                yield LayoutPanel(id="layout-panel")
                yield ParamBrowser(id="param-browser")
        yield ParamDetails(id="param-details")
        yield Static("", id="scan-status")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(LayoutPanel).update(f"Scanning {display_path(self.root)} …")
        self.query_one(RunTree).focus()
        self.scan_root()

    # --- the root scan -------------------------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="scan", exit_on_error=False, description="Scanning the root directory")
    def scan_root(self) -> None:
        worker = get_current_worker()
        start = last = time.monotonic()
        batch: list[engine.Run] = []
        count = 0
        for run in engine.iter_runs(self.root):
            if worker.is_cancelled:
                return
            batch.append(run)
            count += 1
            now = time.monotonic()
            if count == 1 or now - last >= SCAN_BATCH_SECONDS:
                self.post_message(RunsFound(batch))
                batch, last = [], now
        if batch:
            self.post_message(RunsFound(batch))
        self.post_message(ScanFinished(count, time.monotonic() - start))

    @on(RunsFound)
    def _runs_found(self, message: RunsFound) -> None:
        self.query_one(RunTree).add_runs(message.runs)
        if not self._auto_opened and message.runs and message.runs[0].iterations:
            self._auto_opened = True
            ref = engine.pick_iteration(message.runs[0])
            tree = self.query_one(RunTree)
            tree.call_after_refresh(tree.move_cursor, tree.node_for(ref))  # lines exist after the next refresh
            self.open_iteration(ref)

    @on(ScanFinished)
    def _scan_finished(self, message: ScanFinished) -> None:
        status = f"{message.count} run{'s' if message.count != 1 else ''} under {display_path(self.root)}"
        self.query_one("#scan-status", Static).update(status)
        if message.count == 0:
            self.query_one(LayoutPanel).update(f"No checkpoint found under {display_path(self.root)}.")

    def worker_failed(self, worker: Worker) -> None:
        if worker.group == "scan" and worker.error is not None:
            self.query_one(LayoutPanel).update(f"Could not scan {display_path(self.root)}.")
            self.query_one("#scan-status", Static).update("scan failed")
        elif worker.group == "load":
            self.query_one(LayoutPanel).update("Could not read this iteration (see the error).")

    # --- iterations ----------------------------------------------------------------------------------------------

    def open_iteration(self, ref: IterationRef) -> None:
        """Show an iteration: at once when its metadata was read before, else after a background read."""
        cached = self.app.checkpoints.get(ref.path)  # type: ignore[attr-defined]
        if cached is not None:
            self.post_message(CheckpointLoaded(ref, cached))
            return
        self.query_one(LayoutPanel).update(f"Reading {rel_path(ref.path, self.root)} …")
        self.load_checkpoint(ref)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False, description="Reading checkpoint metadata")
    def load_checkpoint(self, ref: IterationRef) -> None:
        ckpt = engine.read_checkpoint(ref)
        if not get_current_worker().is_cancelled:
            self.post_message(CheckpointLoaded(ref, ckpt))

    @on(CheckpointLoaded)
    def _checkpoint_loaded(self, message: CheckpointLoaded) -> None:
        self.app.checkpoints[message.ref.path] = message.checkpoint  # type: ignore[attr-defined]
        self.checkpoint = message.checkpoint
        self.query_one(RunTree).show_layout(message.ref, message.checkpoint)
        self.query_one(LayoutPanel).show(message.checkpoint, self.root)
        self.query_one(ParamBrowser).show(message.checkpoint)
        self.sub_title = rel_path(message.checkpoint.path, self.root)
        self.refresh_bindings()

    @on(Tree.NodeSelected, "#run-tree")
    @on(Tree.NodeExpanded, "#run-tree")
    def _iteration_chosen(self, event: Tree.NodeSelected | Tree.NodeExpanded) -> None:
        data = event.node.data
        if isinstance(data, IterationRef) and (self.checkpoint is None or self.checkpoint.path != data.path):
            self.open_iteration(data)

    # --- parameters ----------------------------------------------------------------------------------------------

    @on(ParamBrowser.Highlighted)
    def _param_highlighted(self, message: ParamBrowser.Highlighted) -> None:
        self.query_one(ParamDetails).show(message.param)

    @work(thread=True, exclusive=True, group="stats", exit_on_error=False, description="Computing statistics")
    def compute_stats(self, checkpoint_path: str, param: Param) -> None:
        stats = compute_param_stats(param)
        if not get_current_worker().is_cancelled:
            self.post_message(StatsComputed(checkpoint_path, param.name, stats))

    @on(StatsComputed)
    def _stats_computed(self, message: StatsComputed) -> None:
        if self.checkpoint is not None and self.checkpoint.path == message.checkpoint_path:
            self.query_one(ParamDetails).show_stats(message.param_name, message.stats)

    # --- actions -------------------------------------------------------------------------------------------------

    def action_focus_filter(self) -> None:
        self.query_one(ParamBrowser).filter_input.focus()

    def action_leave_filter(self) -> None:
        browser = self.query_one(ParamBrowser)
        if browser.filter_input.has_focus:
            browser.table.focus()

    def action_sort_next(self) -> None:
        self.query_one(ParamBrowser).cycle_sort()

    def action_sort_reverse(self) -> None:
        self.query_one(ParamBrowser).reverse_sort()

    def action_stats(self) -> None:
        param = self.query_one(ParamBrowser).current_param()
        if self.checkpoint is None or param is None:
            self.notify("Highlight a parameter first.", severity="warning")
            return
        self.query_one(ParamDetails).show_pending_stats(param.name)
        self.compute_stats(self.checkpoint.path, param)

    def action_preview(self) -> None:
        if self.checkpoint is None:
            self.notify("Open an iteration first (Enter on it in the tree).", severity="warning")
            return
        self.app.open_preview(self.checkpoint)  # type: ignore[attr-defined]

    def action_rescan(self) -> None:
        self.query_one(RunTree).reset()
        self.query_one("#scan-status", Static).update("Scanning…")
        self.scan_root()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("preview", "stats", "sort_next") and self.checkpoint is None:
            return None  # shown dimmed in the footer until an iteration is open
        return True

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "param-table":
            self.action_stats()
