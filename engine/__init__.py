"""ckpt-explorer engine: read, plan and convert distributed-training checkpoints (headless; no UI imports)."""

from __future__ import annotations

from .discover import discover, iter_runs, pick_iteration, read_checkpoint
from .errors import CheckpointError, OutputExistsError, PlanError
from .layout import Checkpoint, Degrees, Format, Fragment, IterationRef, Param, RankFile, Run, Shard

__all__ = [
    "Checkpoint", "CheckpointError", "Degrees", "Format", "Fragment", "IterationRef", "OutputExistsError",
    "Param", "PlanError", "RankFile", "Run", "Shard", "discover", "iter_runs", "pick_iteration",
    "read_checkpoint",
]
