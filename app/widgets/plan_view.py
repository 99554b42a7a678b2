"""The plan view: totals, destination disk check, warnings and one row per plan item (the executor's own items)."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from engine.plan import Plan, PlanItem, item_tensor_rows

from ..formatting import rel_path, shape, shorten_names, size

MIN_NAME_WIDTH = 16
MAX_TENSOR_LINES = 14
KIND_LABELS = {"copy": "copy file", "write_file": "write file", "universal_optimizer_state": "optimizer state"}


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
        yield Static("", id="plan-item")

    def show_plan(self, plan: Plan, destination: str, free: int) -> None:
        self.plan = plan
        self.query_one("#plan-summary", Static).update(plan_summary(plan, destination, free, self.root))
        self._fill()

    def show_failure(self, cause: str) -> None:
        self.plan = None
        self.query_one("#plan-summary", Static).update(Text.assemble(("Cannot plan this target: ", "bold red"), cause))
        table = self.query_one("#plan-table", DataTable)
        table.clear(columns=True)
        table.display = False
        self.query_one("#plan-item", Static).update("")

    def show_pending(self) -> None:
        if self.plan is None:
            self.query_one("#plan-summary", Static).update(Text("Planning…", "dim"))

    def toggle_flagged(self) -> None:
        self.flagged_only = not self.flagged_only
        self._fill()

    def _items(self) -> tuple[PlanItem, ...]:
        items = self.plan.all_items if self.plan is not None else ()
        return tuple(i for i in items if i.flags) if self.flagged_only else items

    def _fill(self) -> None:
        table = self.query_one("#plan-table", DataTable)
        table.clear(columns=True)
        table.display = self.plan is not None
        if self.plan is None:
            return
        items = self._items()
        cells = [(i.name, i.rule or KIND_LABELS.get(i.kind, i.kind), _shapes(i.target_shapes), size(i.write_bytes))
                 for i in items]
        labels = ("item", "rule", "shape per rank", "writes")
        widths = [max([len(label)] + [len(row[k]) for row in cells]) for k, label in enumerate(labels)]
        widths[0] = max(MIN_NAME_WIDTH, min(widths[0], (self.size.width or 80) - 2 - sum(widths[1:]) - 2 * 4))
        for key, label, width in zip(("name", "rule", "shapes", "write"), labels, widths):
            table.add_column(label, key=key, width=width)
        names = shorten_names([row[0] for row in cells], widths[0])
        for item, name, (_, rule, shapes, write) in zip(items, names, cells):
            style = "yellow" if item.flags else ""
            table.add_row(
                Text(name, style),
                Text(rule, style or ("" if item.rule else "dim")),
                shapes,
                Text(write, justify="right"),
                key=item.id,
            )
        self._show_item(items[0] if items else None)

    @on(DataTable.RowHighlighted, "#plan-table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        self._show_item(next((i for i in self._items() if i.id == key), None))

    def _show_item(self, item: PlanItem | None) -> None:
        detail = self.query_one("#plan-item", Static)
        if item is None:
            detail.update(Text("Nothing flagged." if self.flagged_only else "", "dim"))
            return
        lines = [Text.assemble((item.name, "bold"), (f"  → {', '.join(item.outputs[:3])}", "dim"),
                               (f" (+{len(item.outputs) - 3} more)" if len(item.outputs) > 3 else "", "dim"),
                               no_wrap=True, overflow="ellipsis")]
        lines.append(Text(f"reads {size(item.read_bytes)} · writes {size(item.write_bytes)} · "
                          f"peak memory ≈ {size(item.peak_bytes)}", "dim"))
        lines += [Text(f"⚠ {flag}", "yellow", no_wrap=True, overflow="ellipsis") for flag in item.flags]
        rows = item_tensor_rows(item)
        if rows:
            width = min(max(len(name) for name, _, _ in rows), 60)
            for name, label, local in rows[:MAX_TENSOR_LINES]:
                lines.append(Text.assemble(f"  {name[:width]:<{width}}  ", (f"{label:<24}", "cyan"),
                                           shape(local) if local else "", no_wrap=True, overflow="ellipsis"))
            if len(rows) > MAX_TENSOR_LINES:
                lines.append(Text(f"  … {len(rows) - MAX_TENSOR_LINES} more tensors", "dim"))
        detail.update(Group(*lines))


def plan_summary(p: Plan, destination: str, free: int, root: str) -> RenderableType:
    flagged = len(p.flagged)
    needed = p.disk_needed
    enough = free >= needed
    line = {"no_wrap": True, "overflow": "ellipsis"}
    parts: list[RenderableType] = [
        Text(p.target.describe(), "bold", **line),
        Text(f"{p.source_degrees or p.source_format}  →  {p.target_degrees or p.target.kind}", "dim", **line),
        Text.assemble(
            f"{len(p.all_items)} items · ", (f"{flagged} flagged", "bold yellow" if flagged else "green"),
            f" · read {size(p.read_bytes)} · write {size(p.write_bytes)} · memory ≈ {size(p.peak_memory)} per worker",
            **line,
        ),
        Text.assemble(("to ", "dim"), rel_path(destination, root), **line),
        Text.assemble(f"free {size(free)} there, needs {size(needed)} ",
                      ("✓" if enough else "✗ not enough space", "green" if enough else "bold red"), **line),
    ]
    parts += [Text(f"⚠ {w}", "yellow") for w in p.warnings]
    return Group(*parts)


def _shapes(shapes: tuple[tuple[int, ...], ...]) -> str:
    distinct = list(dict.fromkeys(shapes))
    if not distinct:
        return "-"
    if len(distinct) > 3:
        return f"{len(shapes)} tensors"
    text = " | ".join(shape(s) for s in distinct)
    return f"{len(shapes)} × {text}" if len(shapes) > 1 and len(distinct) == 1 else text

