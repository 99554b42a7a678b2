"""The convert confirmation modal: destination, workers, overwrite and resume; shows the disk check live."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Static

from engine.plan import Plan

from ..formatting import display_path, size

DEFAULT_WORKERS = max(1, min(4, os.cpu_count() or 1))


@dataclass(frozen=True)
class ConvertRequest:
    """What the user confirmed: where the output goes and how the run behaves."""

    destination: str
    workers: int
    overwrite: bool
    resume: bool


class ConfirmConvertModal(ModalScreen[ConvertRequest | None]):
    """Returns a ConvertRequest, or None when cancelled."""

    BINDINGS = [
        Binding("escape", "cancel", "Cancel", id="confirm.cancel"),
    ]

    def __init__(self, plan: Plan, destination: str) -> None:
        super().__init__()
        self.plan = plan
        self.default_destination = destination

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog"):
            yield Label(f"Convert: {self.plan.target.describe()}", id="confirm-title")
            yield Static(
                f"{len(self.plan.all_items)} items · read {size(self.plan.read_bytes)} · "
                f"write {size(self.plan.write_bytes)}",
                id="confirm-totals",
            )
            yield Label("destination", classes="form-label")
            yield Input(display_path(self.default_destination), id="confirm-destination")
            yield Static("", id="confirm-disk")
            with Horizontal(id="confirm-options"):
                yield Label("workers", classes="form-label")
                yield Input(str(DEFAULT_WORKERS), type="integer", id="confirm-workers", compact=True)
                yield Checkbox("overwrite", id="confirm-overwrite", compact=True)
                yield Checkbox("resume", id="confirm-resume", compact=True)
            yield Static("Enter in a field or on Convert starts · Esc cancels · Tab moves", id="confirm-hint")
            with Horizontal(id="confirm-buttons"):
                yield Button("Convert", variant="primary", id="confirm-go")
                yield Button("Cancel", id="confirm-cancel")

    def on_mount(self) -> None:
        self.query_one("#confirm-destination", Input).focus()
        self._update_disk()

    @on(Input.Changed, "#confirm-destination")
    def _update_disk(self) -> None:
        dst = self.query_one("#confirm-destination", Input).value.strip()
        if not dst:
            self.query_one("#confirm-disk", Static).update(Text("enter a destination directory", "yellow"))
            return
        try:
            free = self.app.free_disk(dst)  # type: ignore[attr-defined]
        except OSError as exc:
            self.query_one("#confirm-disk", Static).update(Text(str(exc), "red"))
            return
        needed = self.plan.disk_needed
        exists = os.path.isdir(dst) and bool(os.listdir(dst))
        enough = free >= needed
        text = Text.assemble(f"free {size(free)}, needs {size(needed)} ",
                             ("✓" if enough else "✗ not enough space", "green" if enough else "bold red"))
        if exists:
            text.append("  · exists and is not empty: tick overwrite (or resume)", "yellow")
        self.query_one("#confirm-disk", Static).update(text)

    @on(Input.Submitted)
    @on(Button.Pressed, "#confirm-go")
    def action_confirm(self) -> None:
        dst = self.query_one("#confirm-destination", Input).value.strip()
        workers_text = self.query_one("#confirm-workers", Input).value.strip()
        if not dst:
            self.notify("Enter a destination directory.", severity="error")
            return
        workers = int(workers_text) if workers_text.isdigit() and int(workers_text) > 0 else DEFAULT_WORKERS
        self.dismiss(ConvertRequest(
            destination=os.path.abspath(os.path.expanduser(dst)),
            workers=workers,
            overwrite=self.query_one("#confirm-overwrite", Checkbox).value,
            resume=self.query_one("#confirm-resume", Checkbox).value,
        ))

    @on(Button.Pressed, "#confirm-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)
