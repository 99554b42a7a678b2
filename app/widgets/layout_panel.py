"""The layout panel: format, degrees, ZeRO stage, dtype and a pp × tp grid of the files each rank wrote."""

from __future__ import annotations

from collections import defaultdict

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.widgets import Static

from engine import Checkpoint, RankFile

from ..formatting import degrees_text, rel_path, size, zero_text

MAX_TP_COLUMNS = 8
MAX_PP_ROWS = 8
ROLE_NAMES = {"model_states": "model", "optim_states": "optim", "layer": "layers", "model_optim_rng": "model+optim"}


class LayoutPanel(Static):
    """What a checkpoint is, at a glance; empty until an iteration is read."""

    def show(self, ckpt: Checkpoint, root: str) -> None:
        self.update(layout_renderable(ckpt, root))


def layout_renderable(ckpt: Checkpoint, root: str) -> RenderableType:
    head = Text.assemble(
        (rel_path(ckpt.path, root), "bold"),
        ("  ★ latest" if ckpt.latest else "", "bold green"),
    )
    facts = Text.assemble(
        f"{ckpt.format} · ",
        (degrees_text(ckpt), "bold cyan"),
        f" · {zero_text(ckpt)} · {ckpt.dtype or 'dtype unknown'}",
        f" · {len(ckpt.params)} params {size(ckpt.param_bytes)} in {len(ckpt.files)} files {size(ckpt.total_bytes)}",
        no_wrap=True, overflow="ellipsis",
    )
    states = ", ".join(ckpt.optimizer_states) or "none"
    second = Text(f"optimizer {ckpt.optimizer or 'none'}: {states}", "dim", no_wrap=True, overflow="ellipsis")
    parts: list[RenderableType] = [head, facts, second, rank_grid(ckpt)]
    for warning in ckpt.warnings:
        parts.append(Text(f"⚠ {warning}", "yellow"))
    return Group(*parts)


def rank_grid(ckpt: Checkpoint) -> Table:
    """Rows are pipeline stages, columns tensor-parallel ranks; a cell sums that rank's files by role.

    Files that belong to no single stage (DeepSpeed pipeline `layer_XX` files) or no single TP rank get a row or
    column of their own ("any pp" / "any tp").
    """
    cells: dict[tuple[int | None, int | None], list[RankFile]] = defaultdict(list)
    for f in ckpt.files:
        cells[(f.pp, f.tp)].append(f)
    tps = _axis({tp for _, tp in cells})
    pps = _axis({pp for pp, _ in cells})
    table = Table(box=None, padding=(0, 2, 0, 0), show_edge=False, header_style="bold")
    table.add_column("", style="bold")
    for tp in tps[:MAX_TP_COLUMNS]:
        table.add_column("any tp" if tp is None else f"tp {tp}")
    if len(tps) > MAX_TP_COLUMNS:
        table.add_column(f"… {len(tps) - MAX_TP_COLUMNS} more")
    for pp in pps[:MAX_PP_ROWS]:
        row: list[RenderableType] = ["any pp" if pp is None else f"pp {pp}"]
        row += [_cell(cells.get((pp, tp), [])) for tp in tps[:MAX_TP_COLUMNS]]
        table.add_row(*row)
    if len(pps) > MAX_PP_ROWS:
        table.add_row(f"… {len(pps) - MAX_PP_ROWS} more stages")
    return table


def _axis(values: set[int | None]) -> list[int | None]:
    """Ranks in order, with None (belongs to every rank of the axis) last."""
    return sorted(v for v in values if v is not None) + ([None] if None in values else [])


def _cell(files: list[RankFile]) -> Text:
    by_role: dict[str, list[RankFile]] = defaultdict(list)
    for f in files:
        by_role[f.role].append(f)
    text = Text()
    for role, group in by_role.items():
        total = sum(f.size for f in group)
        count = f"×{len(group)} " if len(group) > 1 else ""
        ranks = sorted({f.dp for f in group if f.dp is not None})
        layers = sorted({f.layer for f in group if f.layer is not None})
        where = f"dp {ranks[0]}-{ranks[-1]} " if len(ranks) > 1 else ""
        where += f"{layers[0]:02d}-{layers[-1]:02d} " if len(layers) > 1 else ""
        if text:
            text.append("\n")
        text.append(f"{ROLE_NAMES.get(role, role)} ", "green" if role.startswith("optim") else "")
        text.append(f"{count}{where}", "dim")
        text.append(size(total))
    return text or Text("-", "dim")
