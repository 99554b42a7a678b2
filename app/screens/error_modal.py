"""The error modal: what failed and the engine's one-line cause, dismissed with Enter or Escape."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static


def one_line_cause(error: BaseException) -> str:
    """The error as one line: engine errors already are; others get their type name in front."""
    from engine import CheckpointError, OutputExistsError, PlanError

    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    if isinstance(error, (CheckpointError, PlanError, OutputExistsError, OSError)):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class ErrorModal(ModalScreen[None]):
    """Shows one failure; the app keeps running."""

    BINDINGS = [
        Binding("escape", "dismiss", "Close", id="error.close"),
        Binding("enter", "dismiss", "Close", show=False, id="error.close_enter"),
    ]

    def __init__(self, title: str, cause: str) -> None:
        super().__init__()
        self.error_title = title
        self.cause = cause

    def compose(self) -> ComposeResult:
        with Vertical(id="error-dialog"):
            yield Label(self.error_title, id="error-title")
            yield Static(self.cause, id="error-cause", markup=False)
            yield Button("Close", variant="error", id="error-close")

    def on_mount(self) -> None:
        self.query_one("#error-close", Button).focus()

    def on_button_pressed(self) -> None:
        self.dismiss()
