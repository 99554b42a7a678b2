"""Write screenshots/{browse,details,preview,convert}.svg and .png by driving the app headless on the demo checkpoints.

Usage: python scripts/make_screenshots.py [--out screenshots] [--size 120x40]

Needs: the app's own dependencies; for the PNGs also `pip install cairosvg` plus the Cairo library and a monospace
font (Debian/Ubuntu: `apt-get install -y libcairo2 fonts-dejavu-core`). Without cairosvg only the SVGs are written.
The convert screenshot is a real conversion (two worker processes) paused after a few items while the picture is
taken: the script wraps the convert screen's `execute_plan` so its progress callback waits for the screenshot.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PNG_FONT = "DejaVu Sans Mono"  # replaces the SVG's "Fira Code", which is rarely installed; columns stay aligned
HOLD_AFTER_ITEMS = 6


async def settle(pilot) -> None:
    """Every worker finished and every message handled (a pushed screen may start its worker a moment later)."""
    app = pilot.app
    for _ in range(200):
        await pilot.pause()
        if all(worker.is_finished for worker in app.workers):
            await pilot.pause()
            if all(worker.is_finished for worker in app.workers):
                break
        try:
            await app.workers.wait_for_complete()
        except Exception:  # a failed worker shows its error modal; the screenshot will show it too
            pass
    await pilot.pause(0.2)


async def wait_until(pilot, condition, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not get there in time")
        await pilot.pause(0.05)


def hold_conversion_midway(held: threading.Event, release: threading.Event) -> None:
    """Make the convert screen's run wait, after a few items, until the screenshot is taken."""
    from app.screens import convert

    real = convert.execute_plan

    def execute(plan, dst, *, on_event, **kwargs):
        from engine.progress import EventKind

        def on_event_holding(event) -> None:
            on_event(event)
            if event.kind == EventKind.ITEM_DONE and event.items_done == HOLD_AFTER_ITEMS and not held.is_set():
                held.set()
                release.wait(120)

        return real(plan, dst, on_event=on_event_holding, **kwargs)

    convert.execute_plan = execute


async def shoot(out: str, size: tuple[int, int]) -> list[str]:
    from app.main_app import make_app

    written: list[str] = []
    held, release = threading.Event(), threading.Event()
    hold_conversion_midway(held, release)
    app = make_app("ckpts")

    def save(name: str) -> None:
        path = os.path.join(out, f"{name}.svg")
        with open(path, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(app.export_screenshot(title="ckpt-explorer"))
        written.append(path)

    async with app.run_test(size=size) as pilot:
        await settle(pilot)
        await pilot.press("down", "down", "down", "down", "enter")  # megatron-deepspeed-tp2-pp2 / global_step10
        await settle(pilot)
        save("browse")

        await pilot.press("tab", "tab", "down", "down", "s")  # the qkv weight of layer 2, with statistics
        await settle(pilot)
        save("details")

        await pilot.press("p")
        await settle(pilot)
        await pilot.press("down", "down", "down", "enter", "tab", "end", "ctrl+u", "4", "tab", "end", "ctrl+u", "1")
        await settle(pilot)
        save("preview")

        await pilot.press("shift+tab", "shift+tab", "up", "up", "up", "enter")  # pp → tp → targets: universal
        await settle(pilot)
        await pilot.press("c")
        await settle(pilot)
        app.screen.query_one("#confirm-workers").value = "2"
        await pilot.press("enter")
        await wait_until(pilot, held.is_set)
        await pilot.pause(0.5)
        save("convert")
        release.set()
        await wait_until(pilot, lambda: getattr(app.screen, "finished", False))
        await pilot.pause(0.2)
        save("convert-done")
    return written


def to_png(svg_path: str) -> str | None:
    try:
        import cairosvg
    except ImportError:
        print("cairosvg is not installed: SVG only (pip install cairosvg; apt-get install libcairo2 fonts-dejavu-core)")
        return None
    with open(svg_path, encoding="utf-8") as fh:
        svg = fh.read().replace("Fira Code", PNG_FONT)
    png_path = svg_path[: -len(".svg")] + ".png"
    cairosvg.svg2png(bytestring=svg.encode("utf-8"), write_to=png_path, scale=1.25)
    return png_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "screenshots"))
    parser.add_argument("--size", default="120x40", help="terminal columns x rows")
    args = parser.parse_args()
    columns, rows = (int(v) for v in args.size.lower().split("x"))
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    from app.demo import CHECKPOINTS

    work = tempfile.mkdtemp(prefix="ckpt-explorer-shots-")
    try:
        shutil.copytree(CHECKPOINTS, os.path.join(work, "ckpts"), copy_function=shutil.copyfile)
        os.chdir(work)  # the app shows paths relative to the working directory: "ckpts/..."
        written = asyncio.run(shoot(out, (columns, rows)))
    finally:
        os.chdir(ROOT)
        shutil.rmtree(work, ignore_errors=True)
    for svg in written:
        png = to_png(svg)
        print(f"wrote {os.path.relpath(svg, ROOT)}" + (f" and {os.path.relpath(png, ROOT)}" if png else ""))
    return 0


if __name__ == "__main__":  # the executor's worker processes re-import __main__: keep this guard
    raise SystemExit(main())
