"""Benchmark our converters against DeepSpeed's (ds_to_universal, zero_to_fp32) and `cp -r` on one real checkpoint.

usage: python bench/bench_convert.py CKPT [--workers 2] [--ds-python /tmp/dsvenv/bin/python] [--out /tmp/bench/out]

CKPT is a DeepSpeed checkpoint root (with `latest`). Every tool runs as a subprocess with the same worker count;
before each run the whole source is read once (`cat > /dev/null`) and dirty pages are flushed (`sync`), so every
tool starts with a warm source page cache and a clean write-back queue. Outputs are deleted after each run.
Memory: a sampler walks /proc every 0.1 s and sums VmRSS, RssAnon (the private part) and Pss (shared pages split
among their users) over the child process and all its descendants; it also keeps the largest single process.
RSS includes file pages the tool maps (zero_to_fp32 and our reader both mmap the source) and counts pages shared by
forked workers once per process, which is why anon and PSS are reported as well.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9


@dataclass
class Result:
    name: str
    cmd: list[str]
    rc: int = 0
    wall: float = 0.0
    peak_rss: int = 0  # peak of the sum over the process tree
    peak_anon: int = 0  # peak of the summed RssAnon over the process tree
    peak_pss: int = 0  # peak of the summed Pss (shared pages split among their users) over the process tree
    peak_single: int = 0  # largest VmRSS of any one process
    procs: int = 0  # most processes seen at once
    out_bytes: int = 0
    out_files: int = 0
    note: str = ""
    src_bytes: int = 0
    walls: list[float] = field(default_factory=list)  # every run's wall time (repeats)
    tail: str = field(default="", repr=False)


def _proc_table() -> dict[int, int]:
    """pid -> ppid for every process."""
    table: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        rest = data[data.rfind(b")") + 2:].split()
        table[int(entry)] = int(rest[1])
    return table


def _mem(pid: int) -> tuple[int, int, int]:
    """(VmRSS, RssAnon, Pss) of one process in bytes (0 when it is gone)."""
    rss = anon = pss = 0
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    return rss, anon, pss


def _tree(root: int) -> list[int]:
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def run_measured(name: str, cmd: list[str], env: dict[str, str], interval: float = 0.1) -> Result:
    res = Result(name, cmd)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=REPO)
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: proc.stdout.read(65536), b"")), daemon=True)
    reader.start()
    while proc.poll() is None:
        pids = _tree(proc.pid)
        mems = [_mem(p) for p in pids]
        res.peak_rss = max(res.peak_rss, sum(m[0] for m in mems))
        res.peak_anon = max(res.peak_anon, sum(m[1] for m in mems))
        res.peak_pss = max(res.peak_pss, sum(m[2] for m in mems))
        res.peak_single = max([res.peak_single] + [m[0] for m in mems])
        res.procs = max(res.procs, len(pids))
        time.sleep(interval)
    res.wall = time.monotonic() - start
    reader.join()
    res.rc = proc.returncode
    res.tail = b"".join(chunks).decode(errors="replace")[-3000:]
    return res


def warm(path: str) -> int:
    """Read every file under `path` once (into the page cache); returns the bytes read."""
    total = 0
    files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True) if files else None
    for f in files:
        total += os.path.getsize(f)
    subprocess.run(["sync"], check=True)
    return total


def du(path: str) -> tuple[int, int]:
    size = count = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            size += os.path.getsize(os.path.join(d, f))
            count += 1
    return size, count


def largest_param_bytes(ckpt: str) -> tuple[int, int, int]:
    """(largest param fp32 bytes, number of params, total params) from our metadata reader."""
    sys.path.insert(0, REPO)
    from engine import discover, pick_iteration, read_checkpoint

    c = read_checkpoint(pick_iteration(discover(ckpt)[0]))
    return max(p.numel for p in c.params) * 4, len(c.params), sum(p.numel for p in c.params)


def ours_cmd(src: str, dst: str, to: str, workers: int) -> list[str]:
    return [sys.executable, "-m", "app.cli", "convert", src, dst, "--to", to, "--workers", str(workers), "--quiet"]


def tools(ckpt: str, tag: str, out: str, workers: int, ds_py: str) -> list[tuple[str, list[str], str]]:
    """(name, command, output path) for every tool, in run order."""
    return [
        ("ds_to_universal", [ds_py, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                             os.path.join(ckpt, tag), "--output_folder", os.path.join(out, f"{tag}_universal"),
                             "--num_extract_workers", str(workers), "--num_merge_workers", str(workers),
                             "--inject_missing_state"], out),
        ("ours universal", ours_cmd(ckpt, out, "universal", workers), out),
        ("zero_to_fp32", [ds_py, "-m", "deepspeed.utils.zero_to_fp32", ckpt, out, "--safe_serialization"], out),
        ("ours safetensors", ours_cmd(ckpt, out, "safetensors", workers), out),
        ("cp -r", ["cp", "-r", ckpt, out], out),
    ]


def fmt_gb(n: int) -> str:
    return f"{n / GB:.2f} GB"


def engine_version() -> str:
    """The commit the engine was measured at, and a short hash of uncommitted engine changes (it is a moving target)."""
    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else "?"

    diff = git("diff", "HEAD", "--", "engine", "app")
    dirty = f" + uncommitted engine/app changes {zlib.crc32(diff.encode()):08x}" if diff and diff != "?" else ""
    return git("rev-parse", "--short", "HEAD") + dirty


def report(results: dict[str, Result], ckpt: str, src_bytes: int, largest: int, n_params: int, total: int,
           workers: int) -> str:
    lines = [f"engine: {engine_version()}",
             f"checkpoint: {ckpt}  ({fmt_gb(src_bytes)}, {n_params} tensors, {total / 1e6:.1f} M params, "
             f"largest tensor {fmt_gb(largest)} fp32)",
             f"workers: {workers}; every run starts with the source read once (cat > /dev/null) and `sync`: "
             "warm cache; wall = the fastest of the rounds (all walls listed)",
             "RSS = peak of VmRSS summed over the process tree (sampled every 0.1 s; counts mapped page cache and "
             "shared pages once per process); anon = the same for RssAnon (private memory); PSS = the same for Pss "
             "(shared pages split among their users); max1 = largest single-process VmRSS", "",
             f"{'tool':<18} {'rc':>3} {'wall s':>8} {'tree RSS':>10} {'tree anon':>10} {'tree PSS':>10} "
             f"{'max1 RSS':>10} {'procs':>5} {'output':>10} {'files':>6}  all walls"]
    for r in results.values():
        lines.append(f"{r.name:<18} {r.rc:>3} {r.wall:>8.1f} {fmt_gb(r.peak_rss):>10} {fmt_gb(r.peak_anon):>10} "
                     f"{fmt_gb(r.peak_pss):>10} {fmt_gb(r.peak_single):>10} {r.procs:>5} {fmt_gb(r.out_bytes):>10} "
                     f"{r.out_files:>6}  {'/'.join(f'{w:.1f}' for w in r.walls)}"
                     + (f"  {r.note}" if r.note else ""))
    lines.append("")

    def ok(name: str) -> Result | None:
        r = results.get(name)
        return r if r is not None and r.rc == 0 else None

    budget = 3 * largest + 0.5 * GB

    def verdict(good: bool) -> str:
        return "MET" if good else "MISSED"

    dsu, ou, z2f, os_, cp = (ok(n) for n in ("ds_to_universal", "ours universal", "zero_to_fp32",
                                                   "ours safetensors", "cp -r"))
    if dsu and ou:
        x = dsu.wall / ou.wall
        lines.append(f"ds_to_universal / ours universal: {x:.2f}x faster  (target >= 5x: {verdict(x >= 5)})")
    if z2f and os_:
        x = z2f.wall / os_.wall
        m = os_.peak_rss / z2f.peak_rss
        ma = os_.peak_anon / max(z2f.peak_anon, 1)
        lines.append(f"zero_to_fp32 / ours safetensors: {x:.2f}x faster  (target >= 3x: {verdict(x >= 3)})"
                     f"; RSS ours/theirs {m:.2f} (target <= 0.25: {verdict(m <= 0.25)})"
                     f"; anon ours/theirs {ma:.2f}; PSS ours/theirs {os_.peak_pss / max(z2f.peak_pss, 1):.2f}")
    for r, label in ((ou, "universal"), (os_, "safetensors")):
        if r and cp:
            x = r.wall / cp.wall
            lines.append(f"ours {label} / cp -r: {x:.2f}x the copy time  (target <= 1.5x: {verdict(x <= 1.5)})")
        if r:
            lines.append(f"ours {label} peak tree RSS {fmt_gb(r.peak_rss)} (anon {fmt_gb(r.peak_anon)}, PSS "
                         f"{fmt_gb(r.peak_pss)}) vs budget 3 x {fmt_gb(largest)} + 0.5 GB = {fmt_gb(int(budget))}: "
                         f"RSS {verdict(r.peak_rss <= budget)}, anon {verdict(r.peak_anon <= budget)}, "
                         f"PSS {verdict(r.peak_pss <= budget)}")
    return "\n".join(lines)


def run_one(name: str, cmd: list[str], out: str, ckpt: str, env: dict[str, str]) -> Result:
    """One measured run of one tool: clean output, warm source, run, size the output, delete it."""
    partial = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.ckpt-explorer-partial")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if not name.startswith(("ours", "cp")):  # DeepSpeed's tools write into an existing folder
        os.makedirs(out, exist_ok=True)
    src_bytes = warm(ckpt)
    print(f"running {name} (load average {os.getloadavg()[0]:.1f}): {' '.join(cmd)}", flush=True)
    r = run_measured(name, cmd, env)
    r.src_bytes = src_bytes
    r.out_bytes, r.out_files = du(out) if os.path.exists(out) else (0, 0)
    if r.rc != 0:
        r.note = "FAILED: " + (r.tail.strip().splitlines() or ["?"])[-1][:150]
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run(["sync"], check=True)
    return r


def merge(prev: Result | None, r: Result) -> Result:
    """Keep the fastest successful wall time and the highest memory peaks over repeated runs."""
    if prev is None:
        return r
    if prev.rc == 0 and (r.rc != 0 or prev.wall < r.wall):
        r.wall, r.rc, r.note = prev.wall, prev.rc, prev.note
    r.peak_rss, r.peak_anon, r.peak_pss = max(r.peak_rss, prev.peak_rss), max(r.peak_anon, prev.peak_anon), \
        max(r.peak_pss, prev.peak_pss)
    r.peak_single, r.procs = max(r.peak_single, prev.peak_single), max(r.procs, prev.procs)
    return r


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--ds-python", default=os.environ.get("CKPT_EXPLORER_DS_PYTHON", "/tmp/dsvenv/bin/python"))
    ap.add_argument("--out", default="/tmp/bench/out", help="scratch output folder (deleted after each run)")
    ap.add_argument("--only", action="append", help="run only these tools (repeatable)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over all tools; the fastest wall time and the "
                    "highest peak memory of each are kept (the box may be shared)")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    ckpt = os.path.abspath(a.ckpt)
    with open(os.path.join(ckpt, "latest"), encoding="utf-8") as fh:
        tag = fh.read().strip()
    largest, n_params, total = largest_param_bytes(ckpt)
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    results: dict[str, Result] = {}
    walls: dict[str, list[float]] = {}
    src_bytes = 0
    plan = [t for t in tools(ckpt, tag, os.path.abspath(a.out), a.workers, a.ds_python)
            if not a.only or t[0] in a.only]
    for round_no in range(max(1, a.repeat)):  # round-robin, so a busy spell on a shared box hits every tool alike
        for name, cmd, out in plan:
            r = run_one(name, cmd, out, ckpt, env)
            src_bytes = r.src_bytes
            print(f"  [{round_no + 1}] rc={r.rc} wall={r.wall:.1f}s tree RSS={fmt_gb(r.peak_rss)} "
                  f"anon={fmt_gb(r.peak_anon)} PSS={fmt_gb(r.peak_pss)} output={fmt_gb(r.out_bytes)} in "
                  f"{r.out_files} files", flush=True)
            walls.setdefault(name, []).append(r.wall if r.rc == 0 else float("nan"))
            results[name] = merge(results.get(name), r)
    for name, r in results.items():
        r.walls = walls[name]
    text = report(results, ckpt, src_bytes, largest, n_params, total, a.workers)
    print("\n" + text)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as fh:
            fields = ("cmd", "rc", "wall", "walls", "peak_rss", "peak_anon", "peak_pss", "peak_single", "procs",
                      "out_bytes", "out_files", "note")
            json.dump({k: {f: getattr(v, f) for f in fields}
                       for k, v in results.items()} | {"largest_param_bytes": largest, "source_bytes": src_bytes},
                      fh, indent=1)
    return 0 if all(r.rc == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
