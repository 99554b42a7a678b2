"""One pane per executor worker: the item it is writing and how far it got."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, ProgressBar


class WorkerPane(Vertical):
    """Shows 'idle' or the current item with a byte progress bar."""

    def __init__(self, index: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.index = index
        self.item: str | None = None
        self.items_done = 0

    def compose(self) -> ComposeResult:
        yield Label(f"worker {self.index}", classes="worker-title")
        yield Label("idle", classes="worker-item")
        yield ProgressBar(total=1, show_eta=False, classes="worker-bar")

    def start(self, item: str, total: int) -> None:
        self.item = item
        self.query_one(".worker-item", Label).update(_item_label(item))
        self.query_one(ProgressBar).update(total=max(1, total), progress=0)

    def advance(self, done: int, total: int) -> None:
        self.query_one(ProgressBar).update(total=max(1, total), progress=min(done, max(1, total)))

    def idle(self) -> None:
        """No item in hand: the run is complete."""
        self.item = None
        self.query_one(".worker-item", Label).update("idle")
        self.query_one(ProgressBar).update(total=1, progress=1)

    def finish(self) -> None:
        self.items_done += 1
        self.item = None
        self.query_one(".worker-title", Label).update(f"worker {self.index} · {self.items_done} done")
        self.query_one(".worker-item", Label).update("idle")
        bar = self.query_one(ProgressBar)
        bar.update(progress=bar.total or 1)


def _item_label(item_id: str) -> str:
    """Plan item ids read 'param:<name>' or 'copy:<file>'; the pane shows the name."""
    return item_id.split(":", 1)[-1]
