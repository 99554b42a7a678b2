"""Pilot tests of the browse screen on real DeepSpeed / Megatron-DeepSpeed fixtures (copied to tmp_path)."""

from __future__ import annotations

import io
import os

import pytest
import torch
from rich.console import Console
from textual.widgets import DataTable, Input, Static

import engine
from app.main_app import make_app
from app.messages import CheckpointLoaded, RunsFound, ScanFinished, StatsComputed
from app.screens.browse import BrowseScreen
from app.screens.error_modal import ErrorModal
from app.screens.help import HelpScreen
from app.screens.preview import PreviewScreen
from app.widgets.layout_panel import LayoutPanel
from app.widgets.param_browser import ParamBrowser
from app.widgets.run_tree import RunTree

SIZE = (120, 40)
FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def plain(content: object) -> str:
    """What a Static shows, as plain text."""
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(content)
    return console.file.getvalue()  # type: ignore[attr-defined]




async def test_scan_shows_runs_and_opens_the_latest_iteration(ckpt_root, settle):
    messages: list[object] = []
    app = make_app(str(ckpt_root))
    async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
        await settle(pilot)
        runs = [run for m in messages if isinstance(m, RunsFound) for run in m.runs]
        assert [os.path.basename(r.root) for r in runs] == ["deepspeed-z2", "megatron-tp2-pp2"]
        assert [m.count for m in messages if isinstance(m, ScanFinished)] == [2]

        loaded = [m for m in messages if isinstance(m, CheckpointLoaded)]
        assert len(loaded) == 1 and loaded[0].ref.latest and loaded[0].ref.tag == "global_step3"
        expected = engine.read_checkpoint(loaded[0].ref)
        screen = app.screen
        assert isinstance(screen, BrowseScreen)
        assert screen.query_one("#param-table", DataTable).row_count == len(expected.params)
        layout = plain(screen.query_one(LayoutPanel).content)
        assert "deepspeed-z2/global_step3" in layout and "tp 1 × pp 1 × dp 2" in layout and "ZeRO-2" in layout

        tree = screen.query_one(RunTree)
        labels = [str(node.label) for node in tree.root.children[1].children]
        assert labels == ["global_step10  ★ latest", "global_step5"]  # newest first, latest marked
        assert tree.cursor_node is not None and tree.cursor_node.data == loaded[0].ref


async def test_keyboard_opens_another_iteration_and_its_layout(ckpt_root, settle):
    messages: list[object] = []
    app = make_app(str(ckpt_root))
    async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
        await settle(pilot)
        await pilot.press("down", "down", "down", "enter")  # run → global_step10 → global_step5
        await settle(pilot)
        loaded = [m for m in messages if isinstance(m, CheckpointLoaded)]
        assert [m.ref.tag for m in loaded] == ["global_step3", "global_step5"]
        ckpt = loaded[-1].checkpoint
        assert (ckpt.degrees.tp, ckpt.degrees.pp) == (2, 2)
        layout = plain(app.screen.query_one(LayoutPanel).content)
        assert "tp 2 × pp 2 × dp 1" in layout and "pp 1" in layout and "layers ×6" in layout
        node = app.screen.query_one(RunTree).cursor_node
        assert node is not None and node.is_expanded
        assert [str(child.label) for child in node.children][:2] == ["tp 2 × pp 2 × dp 1", "ZeRO-1 · bfloat16"]


async def test_filter_and_sort_the_parameter_list(ckpt_root, settle):
    app = make_app(str(ckpt_root))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("down", "down", "enter")  # megatron global_step10 (latest)
        await settle(pilot)
        browser = app.screen.query_one(ParamBrowser)
        table = browser.table
        all_names = [p.name for p in browser.params]

        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press(*"dense_4h")
        await pilot.pause()
        shown = [str(table.get_row_at(i)[0]) for i in range(table.row_count)]
        assert shown and len(shown) == sum("dense_4h" in n for n in all_names)
        assert all("dense_4h" in n for n in shown)

        await pilot.press("escape")
        assert app.focused is table
        browser.filter_input.value = ""
        await pilot.pause()
        assert table.row_count == len(all_names)

        await pilot.press("o")  # checkpoint order → name
        assert browser.sort_key == "name"
        assert [k.value for k in table.rows] == sorted(all_names)
        await pilot.press("o")  # → size, biggest first
        sizes = [browser_param.nbytes for browser_param in browser.visible_params()]
        assert browser.sort_key == "size" and sizes == sorted(sizes, reverse=True)
        await pilot.press("O")
        assert [p.nbytes for p in browser.visible_params()] == sorted(sizes)


async def test_statistics_are_computed_off_the_ui_thread_and_match_torch(ckpt_root, settle):
    """Pressing s on a parameter reads its fp32 fragments in a worker; compare with the reference fp32 weights."""
    messages: list[object] = []
    app = make_app(str(ckpt_root))
    async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
        await settle(pilot)
        await pilot.press("tab", "tab")  # tree → filter → parameter table
        await pilot.press("down", "s")
        await settle(pilot)
        stats = [m for m in messages if isinstance(m, StatsComputed)]
        assert len(stats) == 1
        name = stats[0].param_name
        reference = torch.load(os.path.join(FIXTURES, "deepspeed-0.19.8/z2_fp32_ws2/reference_fp32.pt"),
                               weights_only=True)
        values = reference[name].double()
        got = stats[0].stats
        assert got.numel == values.numel()
        assert got.min == pytest.approx(values.min().item()) and got.max == pytest.approx(values.max().item())
        assert got.mean == pytest.approx(values.mean().item(), abs=1e-9)
        assert got.norm == pytest.approx(values.norm().item(), rel=1e-9)
        assert got.nan == 0 and got.inf == 0
        shown = plain(app.screen.query_one("#param-stats", Static).content)
        assert f"{got.norm:.4g}" in shown


async def test_missing_root_is_an_error_modal_not_a_traceback(tmp_path, settle):
    app = make_app(str(tmp_path / "nope"))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, ErrorModal)
        assert app.screen.cause == f"{tmp_path / 'nope'}: no such file or directory"
        await pilot.press("escape")
        assert isinstance(app.screen, BrowseScreen)


async def test_unreadable_checkpoint_is_reported_with_its_file(ckpt_root, settle):
    """A truncated optimizer file: the read fails in the worker and the modal names the file."""
    bad = ckpt_root / "deepspeed-z2" / "global_step3" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    app = make_app(str(ckpt_root))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, ErrorModal)
        assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in app.screen.cause
        assert "Traceback" not in app.screen.cause and "\n" not in app.screen.cause


async def test_help_and_command_palette_reach_the_main_actions(ckpt_root, settle):
    app = make_app(str(ckpt_root))
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, BrowseScreen)
        await pilot.press("ctrl+p", *"preview a conversion")
        await settle(pilot)  # the palette searches its providers in a worker
        await pilot.press("enter")
        await settle(pilot)
        assert isinstance(app.screen, PreviewScreen) and app.screen.plan is not None


async def test_scan_posts_the_first_run_at_once_then_batches(tmp_path, settle):
    """A root of 60 runs (480 rank files, symlinked to one real fixture): runs stream in, first one alone."""
    src = os.path.join(FIXTURES, "deepspeed-0.19.8/tp2_z3_fp32_ws4/ckpt")
    for i in range(60):
        run = tmp_path / "ckpts" / f"team{i // 20}" / f"run{i:02d}"
        for dirpath, _, files in os.walk(src):
            target = run / os.path.relpath(dirpath, src)
            target.mkdir(parents=True, exist_ok=True)
            for name in files:
                (target / name).symlink_to(os.path.join(dirpath, name))
    messages: list[object] = []
    app = make_app(str(tmp_path / "ckpts"))
    async with app.run_test(size=SIZE, message_hook=messages.append) as pilot:
        await settle(pilot)
        batches = [m.runs for m in messages if isinstance(m, RunsFound)]
        assert len(batches[0]) == 1  # the first screen does not wait for the walk
        assert sum(len(b) for b in batches) == 60 == len(app.screen.query_one(RunTree).root.children)
        assert [m.count for m in messages if isinstance(m, ScanFinished)] == [60]
