"""Command palette entries for the main actions of whichever screen is showing."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

# (title, help, action name on the screen)
COMMANDS = (
    ("Preview a conversion of this iteration", "Pick a target and see the plan", "preview"),
    ("Filter parameters", "Type part of a parameter name", "focus_filter"),
    ("Sort parameters by the next column", "Name, size, shape, rule, dtype", "sort_next"),
    ("Compute statistics of the highlighted parameter", "min/max/mean/std/norm/NaN/Inf", "stats"),
    ("Rescan the root directory", "Find runs written since the app started", "rescan"),
    ("Convert with this plan…", "Choose a destination and run", "convert"),
    ("Show only flagged plan items", "Toggle", "toggle_flagged"),
    ("Cancel the conversion", "Stops after the items in flight; resumable", "cancel"),
)


class ExplorerCommands(Provider):
    """Offers the current screen's actions (and help) by name."""

    def _available(self) -> list[tuple[str, str, object]]:
        screen = self.screen
        found: list[tuple[str, str, object]] = []
        for title, help_text, action in COMMANDS:
            if hasattr(screen, f"action_{action}") and screen.check_action(action, ()) is True:
                found.append((title, help_text, partial(screen.run_action, action)))
        found.append(("Show keys and help", "F1 or ?", partial(self.app.run_action, "help")))
        return found

    async def discover(self) -> Hits:
        for title, help_text, callback in self._available():
            yield DiscoveryHit(title, callback, help=help_text)  # type: ignore[arg-type]

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for title, help_text, callback in self._available():
            score = matcher.match(title)
            if score > 0:
                yield Hit(score, matcher.highlight(title), callback, help=help_text)  # type: ignore[arg-type]
