"""Messages the app's thread workers post to the UI: plain dataclasses carrying engine objects."""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from engine import Checkpoint, IterationRef, Run
from engine.execute import ExecResult
from engine.plan import Plan
from engine.progress import EventKind, ProgressEvent


@dataclass
class RunsFound(Message, bubble=False):
    """A batch of runs the root scan found (posted about every 0.1 s, the first one at once)."""

    runs: list[Run]


@dataclass
class ScanFinished(Message, bubble=False):
    """The root scan walked everything; `count` runs in all."""

    count: int
    seconds: float


@dataclass
class CheckpointLoaded(Message, bubble=False):
    """An iteration's metadata was read."""

    ref: IterationRef
    checkpoint: Checkpoint


@dataclass
class StatsComputed(Message, bubble=False):
    """Statistics of one parameter, computed off the UI thread."""

    checkpoint_path: str
    param_name: str
    stats: object  # an engine.stats.ParamStats


@dataclass
class PlanReady(Message, bubble=False):
    """The engine planned a conversion (the same Plan object the executor will run)."""

    plan: Plan


@dataclass
class PlanFailed(Message, bubble=False):
    """The target cannot be planned; `cause` is the engine's one-line reason."""

    cause: str


@dataclass
class ExecProgress(Message, bubble=False):
    """One engine progress event. A backlog of ITEM_PROGRESS from one worker collapses to the newest."""

    event: ProgressEvent
    at: float  # when the app received it (time.monotonic); rates and ETA are computed from these

    def can_replace(self, message: Message) -> bool:
        return (
            self.event.kind == EventKind.ITEM_PROGRESS
            and isinstance(message, ExecProgress)
            and message.event.kind == EventKind.ITEM_PROGRESS
            and message.event.worker == self.event.worker
        )


@dataclass
class ExecFinished(Message, bubble=False):
    """`execute_plan` returned (its ExecResult) or stopped on request."""

    result: ExecResult | None  # None when cancelled
    cancelled: bool
