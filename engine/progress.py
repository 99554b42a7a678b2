"""Progress as plain events: the engine emits them, the CLI wraps them in tqdm and the app in Textual messages."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum


class EventKind(str, Enum):
    PLAN = "plan"  # the run starts: overall_total is the bytes to write
    ITEM_START = "item_start"  # a worker took an item
    ITEM_PROGRESS = "item_progress"  # a worker advanced inside an item
    ITEM_DONE = "item_done"  # a worker finished an item (bytes_done = its bytes)
    ITEM_SKIPPED = "item_skipped"  # --resume found the item complete and verified
    LOG = "log"  # a line for the log pane
    DONE = "done"  # every item finished; message holds the summary
    CANCELLED = "cancelled"  # stopped on request; the temporary output is kept for --resume
    ERROR = "error"  # an item failed; message is the one-line cause


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report. Bytes are output bytes; `overall_*` cover the whole run."""

    kind: EventKind
    worker: int | None = None
    item: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    overall_done: int = 0
    overall_total: int = 0
    items_done: int = 0
    items_total: int = 0
    message: str = ""
    time: float = 0.0


ProgressCallback = Callable[[ProgressEvent], None]


class Throttle:
    """Passes at most one ITEM_PROGRESS event per worker every `interval` seconds; other kinds pass at once."""

    def __init__(self, callback: ProgressCallback, interval: float = 0.25) -> None:
        self.callback = callback
        self.interval = interval
        self._last: dict[int | None, float] = {}

    def __call__(self, event: ProgressEvent) -> None:
        if event.kind == EventKind.ITEM_PROGRESS:
            now = time.monotonic()
            if now - self._last.get(event.worker, 0.0) < self.interval:
                return
            self._last[event.worker] = now
        self.callback(event)
