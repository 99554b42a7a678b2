"""Shared pytest setup: a steady Textual (no animations) and a resource tracker started before any app runs."""

from __future__ import annotations

import multiprocessing.resource_tracker
import os

import pytest

# Read by Textual when it is first imported: snapshot tests need a screen without animations in flight.
os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")


@pytest.fixture(scope="session", autouse=True)
def _resource_tracker_running() -> None:
    """Process pools started inside a running Textual app need the tracker started while stderr is a real file."""
    multiprocessing.resource_tracker.ensure_running()
