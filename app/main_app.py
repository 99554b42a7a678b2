"""The app factory and App class: `make_app(path)` builds it, `run_app(path)` runs it in the terminal."""

from __future__ import annotations

import multiprocessing.resource_tracker
import os
from collections.abc import Callable
from functools import partial

from textual.app import App
from textual.binding import Binding

from engine import Checkpoint
from engine.plan import Plan

from .commands import ExplorerCommands
from .screens.browse import BrowseScreen
from .screens.confirm_convert import ConfirmConvertModal, ConvertRequest
from .screens.convert import ConvertScreen
from .screens.error_modal import ErrorModal, one_line_cause
from .screens.help import HelpScreen
from .screens.preview import PreviewScreen
from .targets import free_disk


class CkptExplorerApp(App[None]):
    """Browse the checkpoints under one root, preview a conversion and run it."""

    CSS_PATH = "ckpt_explorer.tcss"
    TITLE = "ckpt-explorer"
    COMMANDS = App.COMMANDS | {ExplorerCommands}
    BINDINGS = [
        Binding("f1", "help", "Help", tooltip="Keys and what each screen does", id="app.help"),
        Binding("question_mark", "help", "Help", show=False, id="app.help_question"),
        Binding("q", "quit", "Quit", tooltip="Leave ckpt-explorer", id="app.quit"),
    ]

    def __init__(self, root: str) -> None:
        # The executor's process pool needs the resource tracker started while sys.stderr is still a real file:
        # once Textual runs, its stderr stand-in has no file descriptor ("bad value(s) in fds_to_keep").
        multiprocessing.resource_tracker.ensure_running()
        super().__init__()
        self.root = os.path.abspath(root)
        self.checkpoints: dict[str, Checkpoint] = {}
        """Metadata already read, by iteration path (reading is the slow part on huge runs)."""
        self.free_disk: Callable[[str], int] = free_disk
        """Free bytes at a destination path; tests and screenshots replace it with a fixed figure."""

    def get_default_screen(self) -> BrowseScreen:
        return BrowseScreen(self.root)

    # --- navigation used by the screens --------------------------------------------------------------------------

    def open_preview(self, checkpoint: Checkpoint) -> None:
        self.push_screen(PreviewScreen(checkpoint, self.root))

    def confirm_conversion(self, plan: Plan, destination: str) -> None:
        """Ask for the destination, then run the plan on the convert screen."""

        def start(request: ConvertRequest | None) -> None:
            if request is not None:
                self.push_screen(ConvertScreen(plan, request), partial(self._conversion_closed, request))

        self.push_screen(ConfirmConvertModal(plan, destination), start)

    def _conversion_closed(self, request: ConvertRequest, succeeded: bool | None) -> None:
        """After a finished run: back to the browser, rescanning when the output landed under the root."""
        if not succeeded:
            return  # stay on the preview: convert again with resume ticked
        if isinstance(self.screen, PreviewScreen):
            self.pop_screen()
        if os.path.abspath(request.destination).startswith(self.root + os.sep):
            for screen in self.screen_stack:
                if isinstance(screen, BrowseScreen):
                    screen.action_rescan()

    def show_error(self, error: BaseException, *, what: str | None = None) -> None:
        """The one way failures reach the user: a modal with the one-line cause, never a traceback."""
        self.push_screen(ErrorModal(f"{what or 'Something'} failed", one_line_cause(error)))

    # --- actions -------------------------------------------------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())


def make_app(path: str, *, demo: bool = False) -> CkptExplorerApp:
    """The app for a checkpoint root (with demo=True: for a fresh copy of the bundled demo checkpoints)."""
    if demo:
        from .demo import prepare_demo

        path = prepare_demo()
    return CkptExplorerApp(path)


def run_app(path: str, *, demo: bool = False) -> None:
    """Run in the terminal. The resource tracker starts first: Textual's stderr has no file descriptor to pass on."""
    multiprocessing.resource_tracker.ensure_running()
    make_app(path, demo=demo).run()
