"""`python -m app PATH` runs the same command line as the `ckpt-explorer` console script."""

from __future__ import annotations

from app.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
