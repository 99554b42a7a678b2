"""The details pane of one parameter: partitioning, where each fragment lives, and statistics on request."""

from __future__ import annotations

import math
import os

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from engine import Param

from ..formatting import shape, shard_shape, size

FRAGMENT_COLUMNS = ("tp/pp/dp", "file", "states", "offset", "numel", "→ local element")


class ParamDetails(Vertical):
    """Shows the highlighted parameter; `show_stats` adds its statistics once computed."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.param: Param | None = None

    def compose(self) -> ComposeResult:
        yield Static("Select an iteration in the tree, then a parameter.", id="param-summary")
        yield Static("", id="param-stats")
        yield DataTable(id="fragment-table", cursor_type="row", zebra_stripes=True)

    def show(self, param: Param | None) -> None:
        if param is not None and self.param is not None and param.name == self.param.name and param is self.param:
            return
        self.param = param
        self.query_one("#param-stats", Static).update("")
        table = self.query_one("#fragment-table", DataTable)
        table.clear(columns=True)
        if param is None:
            self.query_one("#param-summary", Static).update(Text("No parameter matches the filter.", "dim"))
            return
        self.query_one("#param-summary", Static).update(summary(param))
        rows = [
            (f"{tp}/{pp}/{dp}", os.path.basename(file), " ".join(states), f"{start:,}", f"{numel:,}", f"{dst:,}")
            for (tp, pp, dp, file, start, numel, dst), states in group_fragments(param).items()
        ]
        for k, label in enumerate(FRAGMENT_COLUMNS):
            width = max([len(label)] + [len(row[k]) for row in rows])
            table.add_column(label, key=label, width=width)
        for row in rows:
            table.add_row(*row[:3], *(Text(cell, justify="right") for cell in row[3:]))

    def show_pending_stats(self, param_name: str) -> None:
        self.query_one("#param-stats", Static).update(Text(f"computing statistics of {param_name}…", "dim"))

    def show_stats(self, param_name: str, stats: object) -> None:
        if self.param is None or self.param.name != param_name:
            return
        self.query_one("#param-stats", Static).update(stats_renderable(stats))


def group_fragments(param: Param) -> dict[tuple[int, int, int, str, int, int, int], list[str]]:
    """Fragments at the same place of the same file (fp32, exp_avg, exp_avg_sq usually are) share one row."""
    rows: dict[tuple[int, int, int, str, int, int, int], list[str]] = {}
    for f in param.fragments:
        key = (f.tp, f.pp, f.dp, f.tensor.file, f.src_start, f.numel, f.dst_start)
        rows.setdefault(key, []).append(f.state)
    return rows


def summary(param: Param) -> Group:
    facts = Text.assemble((param.name, "bold"), f"   {param.dtype} · {size(param.nbytes)}")
    line = Text.assemble(
        ("global ", "dim"), shape(param.shape),
        ("   per rank ", "dim"), shard_shape(param),
        ("   rule ", "dim"), (param.rule, "yellow" if param.flags else "cyan"),
        ("" if param.partition_dim is None else f" on dim {param.partition_dim}"),
    )
    extras = []
    if param.padded_shape and tuple(param.padded_shape) != tuple(param.shape):
        extras.append(f"padded {shape(param.padded_shape)}")
    if param.tied_to:
        extras.append(f"tied to {param.tied_to}")
    if param.frozen:
        extras.append("frozen")
    extras.append(f"states {', '.join(param.states) or 'none'} · {len(param.fragments)} fragments in "
                  f"{len({f.tensor.file for f in param.fragments})} files")
    parts = [facts, line, Text(" · ".join(extras), "dim")]
    parts += [Text(f"⚠ {flag}", "yellow") for flag in param.flags]
    return Group(*parts)


def stats_renderable(stats: object) -> Table:
    """A one-row table of whatever a ParamStats holds (engine or interim version alike)."""
    table = Table(box=None, padding=(0, 2, 0, 0), show_edge=False, header_style="bold", title_justify="left")
    names = ("min", "max", "mean", "std", "norm", "nan", "inf")
    table.add_column("statistics")
    for name in names:
        table.add_column(name, justify="right")
    row = [f"{getattr(stats, 'state', '?')} · {getattr(stats, 'numel', 0):,} values"]
    for name in names:
        value = getattr(stats, name, None)
        row.append(_number(value, name))
    table.add_row(*row)
    return table


def _number(value: object, name: str) -> Text:
    if value is None:
        return Text("-", "dim")
    if isinstance(value, int):
        return Text(f"{value:,}", "bold red" if value and name in ("nan", "inf") else "")
    if isinstance(value, float) and math.isnan(value):
        return Text("nan", "red")
    return Text(f"{value:.4g}")
