"""Checkpoint families: one module each, all behind the `CheckpointFormat` interface of `base`."""

from __future__ import annotations

from .base import CheckpointFormat, DirListing, registered_formats

__all__ = ["CheckpointFormat", "DirListing", "registered_formats"]
