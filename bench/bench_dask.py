"""Time a universal conversion of SRC on the local process pool (1, 2 workers) and a Dask LocalCluster (1, 2, 4).

usage: python bench/bench_dask.py SRC [--local 1,2] [--dask 1,2,4] [--repeat N] [--out DIR]

Every configuration converts the same plan into a fresh directory (removed afterwards). Source files are read once
before timing so every run sees a warm page cache, and dirty pages are flushed before each run. torch is imported
in every Dask worker before timing, so the table compares executors, not interpreter start-up; Dask cluster
start-up is shown apart. Each local-pool configuration runs in a fresh interpreter, as the CLI would.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.discover import discover, pick_iteration, read_checkpoint  # noqa: E402
from engine.errors import CheckpointError  # noqa: E402
from engine.execute import ItemExecutor, LocalPoolExecutor, execute_plan  # noqa: E402
from engine.layout import Format  # noqa: E402
from engine.plan import Plan, Target, plan_conversion  # noqa: E402


def _counts(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _plan(src: str, tag: str | None, iteration: int | None) -> Plan:
    runs = [r for r in discover(src) if r.format == Format.DEEPSPEED]
    if not runs:
        raise CheckpointError(src, "no DeepSpeed checkpoint found (universal conversion reads DeepSpeed)")
    run = min(runs, key=lambda r: len(r.root))  # the outermost, e.g. a fixture's ckpt/ rather than expected/
    return plan_conversion(read_checkpoint(pick_iteration(run, iteration=iteration, tag=tag)), Target("universal"))


def _warm_cache(plan: Plan) -> None:
    files: set[str] = set()
    for item in plan.all_items:
        if item.param is not None:
            files.update(f.tensor.file for f in item.param.fragments)
        for value in item.args.values():
            if isinstance(value, str) and os.path.isfile(value):
                files.add(value)
    for path in sorted(files):
        with open(path, "rb") as fh:
            while fh.read(1 << 24):
                pass


def _time(plan: Plan, executor: ItemExecutor, out: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        dst = os.path.join(out, "dst")
        shutil.rmtree(dst, ignore_errors=True)
        os.sync()  # no dirty pages of an earlier run are written back inside this one's timing
        start = time.perf_counter()
        execute_plan(plan, dst, executor=executor)
        best = min(best, time.perf_counter() - start)
        shutil.rmtree(dst, ignore_errors=True)
    return best


def _import_torch() -> None:
    import torch  # noqa: F401


def _time_local(src: str, tag: str | None, iteration: int | None, workers: int, out: str, repeat: int) -> float:
    """One local-pool configuration in a fresh interpreter: a pool forked from a process whose OpenMP threads
    already ran (an earlier in-process run) hangs in libgomp, and a fresh process is what the CLI starts from."""
    _import_torch()
    return _time(_plan(src, tag, iteration), LocalPoolExecutor(workers), out, repeat)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", help="a DeepSpeed checkpoint root or tag directory")
    ap.add_argument("--tag")
    ap.add_argument("--iteration", type=int)
    ap.add_argument("--local", type=_counts, default=[1, 2], help="local pool sizes (default 1,2)")
    ap.add_argument("--dask", type=_counts, default=[1, 2, 4], help="LocalCluster worker counts (default 1,2,4)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the best is shown")
    ap.add_argument("--out", help="scratch directory for the outputs (default: a temporary one)")
    args = ap.parse_args(argv)

    plan = _plan(args.src, args.tag, args.iteration)
    _warm_cache(plan)
    _import_torch()
    out = tempfile.mkdtemp(prefix="bench-dask-", dir=args.out)
    mb = plan.write_bytes / 1e6
    print(f"{args.src}: {len(plan.all_items)} items, read {plan.read_bytes / 1e6:.1f} MB, write {mb:.1f} MB; "
          f"{os.cpu_count()} CPUs; load {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[tuple[str, int, float, float | None]] = []
    try:
        for n in args.local:
            with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as fresh:
                seconds = fresh.submit(_time_local, args.src, args.tag, args.iteration, n, out, args.repeat).result()
            rows.append(("local pool", n, seconds, None))
            print(f"  local pool {n}: {seconds:.2f} s", flush=True)
        if args.dask:
            from distributed import Client, LocalCluster

            from engine.dask_executor import DaskExecutor

            for n in args.dask:
                started = time.perf_counter()
                with LocalCluster(n_workers=n, processes=True, threads_per_worker=1, host="127.0.0.1",
                                  dashboard_address=":0") as cluster, Client(cluster, set_as_default=False) as client:
                    client.gather([client.submit(_import_torch, workers=[w], pure=False) for w in client.nthreads()])
                    startup = time.perf_counter() - started
                    rows.append(("dask LocalCluster", n, _time(plan, DaskExecutor(client), out, args.repeat),
                                 startup))
                print(f"  dask {n}: {rows[-1][2]:.2f} s", flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    base = next((s for kind, n, s, _ in rows if kind == "local pool" and n == 1), rows[0][2])
    print()
    print("| executor | workers | seconds | MB/s written | vs local pool 1 | cluster start (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind, n, seconds, startup in rows:
        start_text = f"{startup:.1f}" if startup is not None else "–"
        print(f"| {kind} | {n} | {seconds:.2f} | {mb / seconds:.1f} | {base / seconds:.2f}× | {start_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
