"""The plan view: totals, destination disk check, warnings and one row per plan item (the executor's own items)."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from engine.plan import Plan

from ..formatting import rel_path, shape, size

NAME_WIDTH = 40


class PlanView(Vertical):
    """Renders an engine Plan; `flagged_only` narrows the rows to items the engine flagged."""

    def __init__(self, root: str, **kwargs) -> None:
        super().__init__(**kwargs)
        self.root = root
        self.plan: Plan | None = None
        self.flagged_only = False

    def compose(self) -> ComposeResult:
        yield Static("Planning…", id="plan-summary")
        table: DataTable[object] = DataTable(id="plan-table", cursor_type="row", zebra_stripes=True)
        yield table

    def show_plan(self, plan: Plan, destination: str, free: int) -> None:
        self.plan = plan
        self.query_one("#plan-summary", Static).update(plan_summary(plan, destination, free, self.root))
        self._fill()

    def show_failure(self, cause: str) -> None:
        self.plan = None
        self.query_one("#plan-summary", Static).update(Text.assemble(("Cannot plan this target: ", "bold red"), cause))
        table = self.query_one("#plan-table", DataTable)
        table.clear(columns=True)

    def show_pending(self) -> None:
        summary = self.query_one("#plan-summary", Static)
        if self.plan is None:
            summary.update(Text("Planning…", "dim"))

    def toggle_flagged(self) -> None:
        self.flagged_only = not self.flagged_only
        self._fill()

    def _fill(self) -> None:
        table = self.query_one("#plan-table", DataTable)
        table.clear(columns=True)
        plan = self.plan
        if plan is None:
            return
        for key, label in (("name", "item"), ("rule", "rule"), ("shapes", "new shape per rank"),
                           ("read", "read"), ("write", "write"), ("flags", "flags")):
            table.add_column(label, key=key, width=NAME_WIDTH if key == "name" else None)
        items = plan.all_items
        if self.flagged_only:
            items = tuple(i for i in items if i.flags)
        for item in items:
            flagged = bool(item.flags)
            table.add_row(
                Text(_truncate(item.name, NAME_WIDTH), "yellow" if flagged else ""),
                Text(item.rule or item.kind, "yellow" if flagged else "dim" if not item.rule else ""),
                _shapes(item.target_shapes),
                Text(size(item.read_bytes), justify="right"),
                Text(size(item.write_bytes), justify="right"),
                Text(f"⚠ {item.flags[-1]}" if flagged else "", "yellow"),
                key=item.id,
            )


def plan_summary(p: Plan, destination: str, free: int, root: str) -> RenderableType:
    flagged = len(p.flagged)
    head = Text.assemble(
        (p.target.describe(), "bold"),
        ("   from ", "dim"), p.source_degrees or p.source_format,
        ("  →  ", "dim"), p.target_degrees or p.target.kind,
    )
    totals = Text.assemble(
        f"{len(p.all_items)} items · ",
        (f"{flagged} flagged", "bold yellow" if flagged else "green"),
        f" · read {size(p.read_bytes)} · write {size(p.write_bytes)}",
        f" · peak memory per worker ≈ {size(p.peak_memory)}",
    )
    needed = p.disk_needed
    enough = free >= needed
    disk = Text.assemble(
        ("destination ", "dim"), rel_path(destination, root),
        f" · free {size(free)}, needs {size(needed)} ",
        ("✓" if enough else "✗ not enough space", "green" if enough else "bold red"),
    )
    parts: list[RenderableType] = [head, totals, disk]
    parts += [Text(f"⚠ {w}", "yellow") for w in p.warnings]
    return Group(*parts)


def _shapes(shapes: tuple[tuple[int, ...], ...]) -> str:
    distinct = list(dict.fromkeys(shapes))
    if not distinct:
        return "-"
    text = " | ".join(shape(s) for s in distinct)
    return f"{len(shapes)} × {text}" if len(shapes) > 1 and len(distinct) == 1 else text


def _truncate(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[len(text) - width + 1:]
