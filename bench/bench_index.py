"""Time indexing a checkpoint from metadata: engine.discover + engine.read_checkpoint, cold-ish and warm.

Usage: python bench/bench_index.py PATH [--repeat 5] [--no-evict] [--profile]

Cold-ish: the first run in this process, after asking the kernel to drop the page cache of the files under PATH
(posix_fadvise DONTNEED: only these files, nothing else is touched). Warm: the median of --repeat further runs.
Bytes read are counted twice: what TorchZip asked for (summed over every TorchZip the run created) and the
process's read() bytes from /proc/self/io (rchar; read_bytes there is what actually came from storage).
If `import deepspeed` works, DeepSpeedCheckpoint(tag_dir) is timed the same way for comparison.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def proc_io() -> dict[str, int]:
    try:
        with open("/proc/self/io") as fh:
            return {k: int(v) for k, v in (line.split(":") for line in fh)}
    except OSError:
        return {}


def evict(root: Path) -> int:
    """Drop the page cache of every file under root (best effort). Returns the number of files."""
    n = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)  # dirty pages (a checkpoint just written) cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                n += 1
            except (OSError, AttributeError):
                pass
            finally:
                os.close(fd)
    return n


def disk_usage(root: Path) -> tuple[int, int]:
    files = size = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(dirpath, name))
    return files, size


class ZipCounter:
    """Collects every TorchZip created while active, to sum the bytes they read."""

    def __init__(self) -> None:
        from engine import torchzip

        self.zips: list[Any] = []
        self._orig = torchzip.TorchZip.__init__
        counter = self

        def init(zself, *args: Any, **kwargs: Any) -> None:
            counter._orig(zself, *args, **kwargs)
            counter.zips.append(zself)

        self._patched = init
        self._cls = torchzip.TorchZip

    def __enter__(self) -> ZipCounter:
        self.zips.clear()
        self._cls.__init__ = self._patched
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cls.__init__ = self._orig

    @property
    def bytes_read(self) -> int:
        return sum(z.bytes_read for z in self.zips)


def index_once(path: str) -> tuple[float, Any, dict[str, int]]:
    """One discover + read_checkpoint: wall seconds, the Checkpoint, /proc/self/io deltas (+ 'cpu_us')."""
    import engine
    from engine.tensor_io import forget_files

    forget_files()
    io0 = proc_io()
    c0 = time.process_time()
    t0 = time.perf_counter()
    runs = engine.discover(path)
    if not runs:
        raise SystemExit(f"{path}: no checkpoint found")
    ckpt = engine.read_checkpoint(engine.pick_iteration(runs[0]))
    dt = time.perf_counter() - t0
    cpu = time.process_time() - c0
    io1 = proc_io()
    delta = {k: io1[k] - io0[k] for k in io1 if k in io0}
    delta["cpu_us"] = int(cpu * 1e6)
    return dt, ckpt, delta


def time_deepspeed(tag_dir: Path, repeat: int) -> dict[str, tuple[float, float]] | None:
    """DeepSpeed's own reader, cold and warm: (a) the DeepSpeedCheckpoint constructor alone (lazy: it opens the
    model-state files only), (b) the constructor plus get_zero_checkpoint_state() for every (pp, tp, dp) rank, i.e.
    torch.load of every optimizer file: what DeepSpeed needs to know every rank's fragments, as ds_to_universal
    does first."""
    try:
        from deepspeed.checkpoint import DeepSpeedCheckpoint  # type: ignore[import-not-found]
    except Exception:  # noqa: BLE001  (not installed, or broken install: nothing to compare)
        return None

    def construct() -> Any:
        return DeepSpeedCheckpoint(str(tag_dir))

    def all_ranks() -> None:
        ck = construct()
        for pp in range(ck.pp_degree):
            for tp in range(ck.tp_degree):
                for dp in range(ck.dp_degree):
                    ck.get_zero_checkpoint_state(pp, tp, dp)

    out = {}
    for name, fn in (("constructor only", construct), ("constructor + every rank's optimizer state", all_ranks)):
        evict(tag_dir)
        t0 = time.perf_counter()
        fn()
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(max(1, repeat // 2)):
            t0 = time.perf_counter()
            fn()
            warm.append(time.perf_counter() - t0)
        out[name] = (cold, statistics.median(warm))
    return out


def raw_reader(root: Path, repeat: int) -> list[tuple[str, float]]:
    """load_torch_metadata over every .pt under root, warm, with 1, 4 and 16 threads (median seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.safe_unpickle import load_torch_metadata

    paths = sorted(str(p) for p in root.rglob("*.pt"))
    out = []
    for workers in (1, 4, 16):
        times = []
        for _ in range(max(1, repeat)):
            t0 = time.perf_counter()
            if workers == 1:
                for p in paths:
                    load_torch_metadata(p)
            else:
                with ThreadPoolExecutor(workers) as pool:
                    list(pool.map(load_torch_metadata, paths))
            times.append(time.perf_counter() - t0)
        out.append((f"load_torch_metadata x{len(paths)}, {workers} thread{'s' if workers > 1 else ''}",
                    statistics.median(times)))
    return out


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-evict", action="store_true", help="do not drop the files' page cache before the cold run")
    ap.add_argument("--profile", action="store_true", help="cProfile one warm run and print where the time goes")
    ap.add_argument("--raw", action="store_true", help="also time the safe reader alone over every .pt file")
    args = ap.parse_args(argv)
    path = args.path.resolve()
    files, on_disk = disk_usage(path)
    evicted = 0 if args.no_evict else evict(path)

    t_import = time.perf_counter()
    import engine  # noqa: F401
    from engine.formats.base import registered_formats

    registered_formats()
    t_import = time.perf_counter() - t_import

    with ZipCounter() as zc:
        cold, ckpt, cold_io = index_once(str(path))
        cold_zip_bytes, opened = zc.bytes_read, len(zc.zips)
    warm_times = []
    warm_cpu = []
    warm_io: dict[str, int] = {}
    with ZipCounter() as zc:
        for _ in range(args.repeat):
            dt, ckpt, warm_io = index_once(str(path))
            warm_times.append(dt)
            warm_cpu.append(warm_io["cpu_us"] / 1e6)
        warm_zip_bytes = zc.bytes_read // max(args.repeat, 1)
    warm = statistics.median(warm_times)

    deg = getattr(ckpt, "degrees", None)
    print(f"checkpoint   {path}")
    print(f"layout       {getattr(ckpt, 'format', '?')} {deg}, ZeRO {getattr(ckpt, 'zero_stage', '?')},"
          f" {len(getattr(ckpt, 'params', ()))} params; torch imported: {'torch' in sys.modules}")
    print(f"engine import {t_import:.3f}s (not counted below); page cache dropped for {evicted} files;"
          f" load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print()
    rows = [
        ("files on disk", f"{files}", ""),
        ("bytes on disk", human(on_disk), ""),
        ("torch zip files opened", f"{opened}", ""),
        ("bytes read (TorchZip)", human(cold_zip_bytes), f"{100 * cold_zip_bytes / max(on_disk, 1):.1f}% of disk"),
        ("bytes read (rchar, cold)", human(cold_io.get("rchar", 0)), "all read() calls of the process"),
        ("bytes from storage (cold)", human(cold_io.get("read_bytes", 0)), "/proc/self/io read_bytes"),
        ("bytes read (TorchZip, warm)", human(warm_zip_bytes), "per run"),
        ("bytes read (rchar, warm)", human(warm_io.get("rchar", 0)), "last run"),
        ("cold-ish run", f"{cold:.3f} s", f"{files / cold:,.0f} files/s; CPU {cold_io['cpu_us'] / 1e6:.3f} s"),
        (f"warm run (median of {args.repeat})", f"{warm:.3f} s",
         f"{files / warm:,.0f} files/s; min {min(warm_times):.3f} max {max(warm_times):.3f};"
         f" CPU median {statistics.median(warm_cpu):.3f} s"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>12}  {note}")

    tag_dir = Path(ckpt.meta.get("model_files", [""])[0]).parent if getattr(ckpt, "meta", None) else None
    ds = time_deepspeed(tag_dir, args.repeat) if tag_dir else None
    if ds is None:
        print("\n  deepspeed: not installed (DeepSpeedCheckpoint not timed)")
    else:
        print()
        for name, (ds_cold, ds_warm) in ds.items():
            print(f"  DeepSpeedCheckpoint, {name}: cold {ds_cold:.3f} s, warm {ds_warm:.3f} s"
                  f" (ckpt-explorer / DeepSpeed: {cold / ds_cold:.2f}x cold, {warm / ds_warm:.2f}x warm time)")

    if args.raw:
        print()
        for name, secs in raw_reader(path, args.repeat):
            print(f"  {name}: {secs:.3f} s warm")

    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        index_once(str(path))
        prof.disable()
        print()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
