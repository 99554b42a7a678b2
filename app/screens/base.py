"""The base of every full screen: the single place worker errors turn into the error modal."""

from __future__ import annotations

from textual import on
from textual.screen import Screen
from textual.worker import Worker, WorkerState


class ExplorerScreen(Screen["bool | None"]):
    """A screen whose thread workers report failures as a one-line error modal (never a traceback)."""

    @on(Worker.StateChanged)
    def _report_worker_error(self, event: Worker.StateChanged) -> None:
        if event.state != WorkerState.ERROR or event.worker.error is None:
            return
        self.worker_failed(event.worker)
        self.app.show_error(event.worker.error, what=event.worker.description)  # type: ignore[attr-defined]

    def worker_failed(self, worker: Worker) -> None:
        """Hook for screens that show a failure in place as well (the modal is shown anyway)."""
