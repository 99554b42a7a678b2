"""The help screen (F1 or ?): what each screen is for and its keys, read from the screens' own bindings."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

INTRO = (
    "ckpt-explorer reads checkpoint metadata only: nothing is loaded into memory until you ask for statistics "
    "or convert. Tab moves between panes; Ctrl+P opens the command palette."
)


def _key_table(title: str, bindings: list[BindingType]) -> Group:
    table = Table(box=None, padding=(0, 2, 0, 0), show_header=False)
    table.add_column(style="bold cyan", min_width=10)
    table.add_column()
    for binding in bindings:
        if not isinstance(binding, Binding):
            continue
        table.add_row(_key_name(binding.key), binding.tooltip or binding.description)
    return Group(Text(title, "bold"), table, Text(""))


def _key_name(key: str) -> str:
    return {"slash": "/", "question_mark": "?", "escape": "esc"}.get(key, key)


class HelpScreen(ModalScreen[None]):
    """Keys of every screen; Escape closes."""

    BINDINGS = [
        Binding("escape", "dismiss", "Close", id="help.close"),
        Binding("f1", "dismiss", "Close", show=False, id="help.close_f1"),
        Binding("question_mark", "dismiss", "Close", show=False, id="help.close_q"),
    ]

    def compose(self) -> ComposeResult:
        from ..main_app import CkptExplorerApp
        from .browse import BrowseScreen
        from .convert import ConvertScreen
        from .preview import PreviewScreen

        sections = [
            Text("ckpt-explorer — keys", "bold underline"),
            Text(INTRO),
            Text(""),
            _key_table("Everywhere", CkptExplorerApp.BINDINGS),
            _key_table("Browse: tree of runs, layout, parameters", BrowseScreen.BINDINGS),
            Text("   Enter on an iteration opens it; Enter on a parameter computes its statistics.", "dim"),
            Text(""),
            _key_table("Preview: choose a target, the plan updates as you type", PreviewScreen.BINDINGS),
            _key_table("Convert: live progress", ConvertScreen.BINDINGS),
        ]
        with VerticalScroll(id="help-dialog"):
            yield Static(Group(*sections))
