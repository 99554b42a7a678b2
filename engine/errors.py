"""Error types: every failure the engine reports names the file and the problem in one line."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(Exception):
    """A checkpoint file or directory cannot be read as expected."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")

    def __reduce__(self) -> tuple:  # crosses process boundaries (worker pools) intact
        return (type(self), (self.path, self.problem))


class UnsafePickleError(CheckpointError):
    """A pickle asks for something the restricted unpickler refuses outright."""


class PlanError(Exception):
    """A requested conversion or reshard cannot be planned (bad target, indivisible degree...)."""


class OutputExistsError(Exception):
    """The destination exists and is not empty, and overwriting was not asked for."""
