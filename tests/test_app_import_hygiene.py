"""The engine stays headless: importing any engine module pulls in neither textual nor rich (fresh process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = """
import importlib, json, pkgutil, sys
import engine
skipped = []
for info in pkgutil.walk_packages(engine.__path__, "engine."):
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError as exc:  # an optional dependency (e.g. dask's distributed) that is not installed
        if exc.name.split(".")[0] in ("engine",):
            raise
        skipped.append(info.name)
ui = sorted(m for m in sys.modules if m.split(".")[0] in ("textual", "rich"))
print(json.dumps({"ui": ui, "skipped": skipped, "count": len([m for m in sys.modules if m.startswith("engine")])}))
"""


def test_importing_every_engine_module_pulls_in_no_ui():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ui"] == []
    assert report["count"] > 10  # the walk really imported the engine


def test_the_app_does_import_textual():
    """The probe above would notice: the same check on `app` sees textual (so an empty list means something)."""
    probe = "import sys, app.main_app; print(int('textual' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
