"""The lazy tree of runs → iterations → layout, filled as the root scan and checkpoint reads report."""

from __future__ import annotations

from typing import Union

from rich.text import Text
from textual.widgets import Tree
from textual.widgets.tree import TreeNode

from engine import Checkpoint, IterationRef, RankFile, Run

from ..formatting import degrees_text, rel_path, size, zero_text

NodeData = Union[Run, IterationRef, RankFile, None]

AUTO_EXPAND_RUNS = 8  # expand every run while there are at most this many


class RunTree(Tree[NodeData]):
    """Runs under the root; an iteration's layout appears under it once its metadata is read."""

    def __init__(self, root: str, **kwargs) -> None:
        super().__init__(rel_path(root, root), data=None, **kwargs)
        self.root_path = root
        self.show_root = False
        self.guide_depth = 3
        self._iteration_nodes: dict[str, TreeNode[NodeData]] = {}
        self._run_count = 0

    def add_runs(self, runs: list[Run]) -> None:
        """Append runs (in scan order) with their iterations, newest first."""
        for run in runs:
            self._run_count += 1
            label = Text(rel_path(run.root, self.root_path), "bold")
            node = self.root.add(label, data=run, expand=self._run_count <= AUTO_EXPAND_RUNS)
            for ref in sorted(run.iterations, key=_newest_first):
                label = Text(ref.tag)
                if ref.latest:
                    label.append("  ★ latest", "bold green")
                self._iteration_nodes[ref.path] = node.add(label, data=ref, allow_expand=True)
        self.root.expand()

    def reset(self) -> None:
        """Forget every run (before a rescan)."""
        self.clear()
        self._iteration_nodes.clear()
        self._run_count = 0

    def node_for(self, ref: IterationRef) -> TreeNode[NodeData] | None:
        return self._iteration_nodes.get(ref.path)

    def show_layout(self, ref: IterationRef, ckpt: Checkpoint) -> None:
        """Replace an iteration's children with its layout: degrees, parameters, files."""
        node = self.node_for(ref)
        if node is None or node.children:
            return
        node.add_leaf(Text(degrees_text(ckpt), "cyan"), data=ref)
        node.add_leaf(Text(f"{zero_text(ckpt)} · {ckpt.dtype or 'dtype ?'}", "cyan"), data=ref)
        node.add_leaf(Text(f"{len(ckpt.params)} params · {size(ckpt.param_bytes)}"), data=ref)
        files = node.add(Text(f"{len(ckpt.files)} files · {size(ckpt.total_bytes)}"), data=ref)
        for f in ckpt.files:
            files.add_leaf(Text.assemble(rel_path(f.path, ref.path), (f"  {size(f.size)}", "dim")), data=f)


def _newest_first(ref: IterationRef) -> tuple[int, str]:
    return (-(ref.iteration if ref.iteration is not None else -1), ref.tag)
