"""The one reader interface every checkpoint family implements, and the registry discovery walks.

Call sequence: discovery lists a directory once (`DirListing`) and asks each registered format, in
order, `claim_run(listing)`; the first that returns a `Run` owns that directory and its iteration
directories (discovery does not descend into them). Later, `read(ref)` turns one `IterationRef` of
that run into a full `Checkpoint` (metadata only: no tensor bytes are read).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

from ..layout import Checkpoint, Format, IterationRef, Run
from ..rules import TpRule, TpSpec


@dataclass(frozen=True)
class DirListing:
    """One directory's entries, split into files and subdirectories (names only), from one scandir."""

    path: str
    files: tuple[str, ...]
    dirs: tuple[str, ...]

    @classmethod
    def of(cls, path: str) -> DirListing:
        files: list[str] = []
        dirs: list[str] = []
        try:
            with os.scandir(path) as it:
                for entry in it:
                    try:
                        (dirs if entry.is_dir() else files).append(entry.name)
                    except OSError:
                        continue
        except OSError:
            pass
        return cls(path, tuple(sorted(files)), tuple(sorted(dirs)))

    @cached_property
    def file_set(self) -> frozenset[str]:
        return frozenset(self.files)

    def sub(self, name: str) -> DirListing:
        return DirListing.of(os.path.join(self.path, name))

    def read_text(self, name: str, limit: int = 4096) -> str | None:
        try:
            with open(os.path.join(self.path, name), encoding="utf-8", errors="replace") as fh:
                return fh.read(limit).strip()
        except OSError:
            return None


class CheckpointFormat(ABC):
    """A checkpoint family: recognises its runs from directory listings and reads iterations."""

    format: Format

    @abstractmethod
    def claim_run(self, listing: DirListing) -> Run | None:
        """A Run if `listing` is a run root (or a lone iteration directory) of this family, else None."""

    @abstractmethod
    def read(self, ref: IterationRef) -> Checkpoint:
        """Read one iteration's layout from metadata. Raises CheckpointError naming the bad file."""

    def param_spec(self, ckpt: Checkpoint, name: str) -> TpSpec:
        """The TP rule of parameter `name`: families with richer metadata (QKV version, patterns) override this;
        the default rebuilds it from what the reader recorded on the Param."""
        p = ckpt.param(name)
        rule = TpRule(p.rule) if p.rule in {r.value for r in TpRule} else TpRule.UNKNOWN
        return TpSpec(rule, p.partition_dim)


_REGISTRY: list[CheckpointFormat] = []


def register(fmt: CheckpointFormat) -> CheckpointFormat:
    _REGISTRY.append(fmt)
    return fmt


def registered_formats() -> list[CheckpointFormat]:
    """Formats in the order discovery asks them (most specific first)."""
    from . import load_all  # noqa: F401  (imports every family module once, which registers it)

    return list(_REGISTRY)


def format_for(fmt: Format) -> CheckpointFormat:
    for reader in registered_formats():
        if reader.format == fmt:
            return reader
    raise KeyError(f"no reader for format {fmt}")


def spec_of(ckpt: Checkpoint, name: str) -> TpSpec:
    """The TP rule of one parameter, as the checkpoint's own family reads it."""
    return format_for(ckpt.format).param_spec(ckpt, name)
