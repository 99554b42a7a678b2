"""The parameter list: an incremental filter Input over a sortable DataTable of a checkpoint's parameters."""

from __future__ import annotations

from dataclasses import dataclass
from math import prod

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.message import Message
from textual.widgets import DataTable, Input

from engine import Checkpoint, Param

from ..formatting import shape, shard_shape, shorten_names, size

MIN_NAME_WIDTH = 16

# column key -> (label, sort key); "order" is the checkpoint's own order
COLUMNS: dict[str, tuple[str, object]] = {
    "name": ("name", lambda p: p.name),
    "shape": ("shape", lambda p: (prod(p.shape), p.shape)),
    "shard": ("per rank", lambda p: prod(p.shards[0].shape) if p.shards else prod(p.shape)),
    "rule": ("rule", lambda p: p.rule),
    "dtype": ("dtype", lambda p: p.dtype),
    "size": ("size", lambda p: p.nbytes),
}
SORT_CYCLE = ("order", "name", "size", "shape", "rule", "dtype")


class ParamBrowser(Vertical):
    """Filter by typing (every word must appear in the name), sort by column; posts Highlighted."""

    @dataclass
    class Highlighted(Message):
        """The cursor rests on a parameter (None when the list is empty)."""

        param: Param | None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.params: tuple[Param, ...] = ()
        self.sort_key = "order"
        self.sort_reverse = False
        self.filter_text = ""

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter parameters  (/ to focus, esc to leave)", id="param-filter", compact=True)
        table: DataTable[object] = DataTable(id="param-table", cursor_type="row", zebra_stripes=True)
        yield table

    @property
    def table(self) -> DataTable[object]:
        return self.query_one("#param-table", DataTable)

    @property
    def filter_input(self) -> Input:
        return self.query_one("#param-filter", Input)

    def show(self, ckpt: Checkpoint) -> None:
        self.params = ckpt.params
        self.refresh_rows()

    def visible_params(self) -> list[Param]:
        words = self.filter_text.lower().split()
        rows = [p for p in self.params if all(w in p.name.lower() for w in words)]
        if self.sort_key != "order":
            rows.sort(key=COLUMNS[self.sort_key][1], reverse=self.sort_reverse)
        elif self.sort_reverse:
            rows.reverse()
        return rows

    def refresh_rows(self) -> None:
        table = self.table
        current = self.current_param()
        table.clear(columns=True)
        rows = self.visible_params()
        cells = [(p.name, shape(p.shape), shard_shape(p), p.rule, p.dtype, size(p.nbytes)) for p in rows]
        arrow = " ▼" if self.sort_reverse else " ▲"
        labels = [label + (arrow if key == self.sort_key else "") for key, (label, _) in COLUMNS.items()]
        widths = self._column_widths(labels, cells)
        for key, label, width in zip(COLUMNS, labels, widths):
            table.add_column(label, key=key, width=width)
        names = shorten_names([row[0] for row in cells], widths[0])
        for p, name, (_, global_shape, local, rule, dtype, nbytes) in zip(rows, names, cells):
            style = "yellow" if p.flags else ""
            table.add_row(Text(name, style), global_shape, local, Text(rule, style), dtype,
                          Text(nbytes, justify="right"), key=p.name)
        if current is not None and current.name in {p.name for p in rows}:
            table.move_cursor(row=table.get_row_index(current.name), animate=False)
        self.post_message(self.Highlighted(self.current_param()))

    def _column_widths(self, labels: list[str], cells: list[tuple[str, ...]]) -> list[int]:
        """Fixed widths from the content; the name gets what the others leave (names are shortened in the middle)."""
        widths = [max([len(label)] + [len(row[i]) for row in cells]) for i, label in enumerate(labels)]
        available = (self.size.width or 86) - 2 - sum(widths[1:]) - 2 * len(labels) - 2
        widths[0] = max(MIN_NAME_WIDTH, min(widths[0], available))
        return widths

    def current_param(self) -> Param | None:
        table = self.table
        if not table.row_count:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        for p in self.params:
            if p.name == key:
                return p
        return None

    def cycle_sort(self) -> str:
        """Sort by the next column of SORT_CYCLE; returns its name."""
        self.sort_key = SORT_CYCLE[(SORT_CYCLE.index(self.sort_key) + 1) % len(SORT_CYCLE)]
        self.sort_reverse = self.sort_key == "size"  # biggest first is what one wants by size
        self.refresh_rows()
        return self.sort_key

    def reverse_sort(self) -> None:
        self.sort_reverse = not self.sort_reverse
        self.refresh_rows()

    @on(Input.Changed, "#param-filter")
    def _filter_changed(self, event: Input.Changed) -> None:
        self.filter_text = event.value
        self.refresh_rows()

    @on(Input.Submitted, "#param-filter")
    def _filter_submitted(self) -> None:
        self.table.focus()

    @on(DataTable.RowHighlighted, "#param-table")
    def _row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        event.stop()
        self.post_message(self.Highlighted(self.current_param()))

    @on(DataTable.HeaderSelected, "#param-table")
    def _header_selected(self, event: DataTable.HeaderSelected) -> None:
        key = str(event.column_key.value)
        if key == self.sort_key:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_key, self.sort_reverse = key, key == "size"
        self.refresh_rows()

