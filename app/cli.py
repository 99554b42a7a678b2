"""The `ckpt-explorer` command: the app by default, and headless `inspect`, `check`, `convert`, `reshard`."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from typing import Any

SUBCOMMANDS = ("inspect", "check", "convert", "reshard")
EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


def _size(n: int) -> str:
    import humanize

    return humanize.naturalsize(n, binary=True)


def parse_size(text: str) -> int:
    """'5GB' / '500MiB' / '123' -> bytes."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B?)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MiB)")
    value = float(m.group(1))
    unit = (m.group(2) or "").upper()
    power = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[:1]] if unit else 0
    base = 1024 if "I" in unit else 1000
    return int(value * base**power)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt-explorer",
        description="See inside distributed-training checkpoints, preview a reshard, convert with one key.",
        epilog="Run without a subcommand to open the app: ckpt-explorer /ckpts (or --demo).",
    )
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("inspect", help="list runs, iterations, degrees and parameters (metadata only)")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print a stable JSON document")
    p.add_argument("--params", action="store_true", help="print the parameter table")
    p.add_argument("--iteration", type=int, help="the iteration to detail (default: the one `latest` names)")

    p = sub.add_parser("check", help="validate ranks, files, shapes and partitions; exit 1 on problems")
    p.add_argument("path")
    p.add_argument("--no-replicas", action="store_true",
                   help="skip comparing TP-replicated parameters across ranks (reads their bytes)")

    for name, helptext in (("convert", "convert to DeepSpeed universal or consolidated safetensors/torch"),
                           ("reshard", "change tensor/pipeline-parallel degrees, same format; optional int8")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("src", help="checkpoint root (follows `latest`) or a tag/iteration directory")
        p.add_argument("dst", help="output directory (created atomically)")
        if name == "convert":
            p.add_argument("--to", required=True, choices=("universal", "safetensors", "torch"))
            p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="consolidated dtype (default fp32)")
            p.add_argument("--max-shard-size", type=parse_size, default=5 * 10**9, metavar="SIZE",
                           help="consolidated shard size (default 5GB)")
        else:
            p.add_argument("--tp", type=_positive, required=True, help="target tensor-parallel degree")
            p.add_argument("--pp", type=_positive, help="target pipeline-parallel degree (default: unchanged)")
            p.add_argument("--quantize", choices=("int8",), help="int8 group quantization of the linear weights")
            p.add_argument("--groups", type=_positive, default=64, help="quantization groups (default 64)")
            p.add_argument("--no-mlp-extra-grouping", action="store_true",
                           help="do not double the groups of MLP weights (DeepSpeed doubles them)")
        p.add_argument("--tag", help="iteration tag to read (default: the one `latest` names)")
        p.add_argument("--iteration", type=int, help="iteration number to read")
        p.add_argument("--workers", type=_positive, default=None, help="worker processes (default: the cores)")
        p.add_argument("--scheduler", help="run on a Dask scheduler (tcp://host:port) instead of the local pool")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
        p.add_argument("--resume", action="store_true", help="continue an interrupted run into the same destination")
        p.add_argument("--dry-run", action="store_true", help="print the plan and write nothing")
        p.add_argument("--strict", action="store_true", help="refuse parameters no partition rule recognises")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def build_app_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ckpt-explorer", description="Open the checkpoint explorer app.",
                                     epilog="Subcommands: " + ", ".join(SUBCOMMANDS) + " (ckpt-explorer CMD -h)")
    parser.add_argument("path", nargs="?", help="directory holding checkpoints")
    parser.add_argument("--demo", action="store_true", help="open the built-in demo checkpoints (copied to a temp dir)")
    parser.add_argument("--headless", action="store_true", help="print `inspect` instead of opening the app")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] in ("-h", "--help"):
            build_app_parser().print_help()
            print()
            build_parser().print_help()
            return EXIT_OK
        return _main_app(build_app_parser().parse_args(argv))
    args = build_parser().parse_args(argv)
    from engine.errors import CheckpointError, OutputExistsError, PlanError

    try:
        return {"inspect": cmd_inspect, "check": cmd_check, "convert": cmd_convert, "reshard": cmd_convert}[
            args.command](args)
    except (CheckpointError, PlanError, OutputExistsError) as exc:
        print(f"ckpt-explorer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, OutputExistsError) else EXIT_PROBLEMS
    except KeyboardInterrupt:
        print("ckpt-explorer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `ckpt-explorer inspect … | head`
        sys.stderr.close()
        return EXIT_OK


def _main_app(args: argparse.Namespace) -> int:
    if args.demo:
        from app.demo import prepare_demo

        path = prepare_demo()
        print(f"demo checkpoints copied to {path}", file=sys.stderr)
    elif args.path:
        path = args.path
        if not os.path.exists(path):
            print(f"ckpt-explorer: error: {path}: no such file or directory", file=sys.stderr)
            return EXIT_USAGE
    else:
        build_app_parser().print_usage(sys.stderr)
        print("ckpt-explorer: error: give a PATH, --demo, or a subcommand", file=sys.stderr)
        return EXIT_USAGE
    if args.headless or not sys.stdout.isatty():
        return cmd_inspect(argparse.Namespace(path=path, json=False, params=True, iteration=None))
    import multiprocessing.resource_tracker

    multiprocessing.resource_tracker.ensure_running()  # process pools inside Textual need it (STYLE.md)
    from app.main_app import run_app

    run_app(path)
    return EXIT_OK


# -- inspect -----------------------------------------------------------------------------------------
def _checkpoint_json(ckpt: Any) -> dict[str, Any]:
    return {
        "path": ckpt.path,
        "run": ckpt.run_root,
        "format": str(ckpt.format),
        "tag": ckpt.tag,
        "iteration": ckpt.iteration,
        "latest": ckpt.latest,
        "zero_stage": ckpt.zero_stage,
        "dtype": ckpt.dtype,
        "tp": ckpt.degrees.tp,
        "pp": ckpt.degrees.pp,
        "dp": ckpt.degrees.dp,
        "ep": ckpt.degrees.ep,
        "optimizer": ckpt.optimizer,
        "optimizer_states": list(ckpt.optimizer_states),
        "files": len(ckpt.files),
        "bytes": ckpt.total_bytes,
        "warnings": list(ckpt.warnings),
        "params": [
            {"name": p.name, "shape": list(p.shape), "dtype": p.dtype, "rule": p.rule,
             "partition_dim": p.partition_dim, "frozen": p.frozen, "tied_to": p.tied_to,
             "shards": sorted({tuple(s.shape) for s in p.shards}), "bytes": p.nbytes}
            for p in ckpt.params
        ],
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    from engine import discover, read_checkpoint
    from engine.errors import CheckpointError

    runs = discover(args.path)
    docs: list[dict[str, Any]] = []
    errors: list[str] = []
    lines: list[str] = []
    if not runs:
        print(f"ckpt-explorer: no checkpoints found under {args.path}", file=sys.stderr)
        if args.json:
            print(json.dumps({"checkpoints": [], "errors": []}, indent=2))
        return EXIT_PROBLEMS
    for run in runs:
        lines.append(f"{run.root}  [{run.format}]  {len(run.iterations)} iteration(s)"
                     + (f", latest = {run.latest_tag}" if run.latest_tag else ""))
        for ref in run.iterations:
            try:
                ckpt = read_checkpoint(ref)
            except CheckpointError as exc:
                errors.append(str(exc))
                lines.append(f"  {ref.tag}: ERROR {exc}")
                continue
            docs.append(_checkpoint_json(ckpt))
            mark = " (latest)" if ckpt.latest else ""
            stage = f" ZeRO-{ckpt.zero_stage}" if ckpt.zero_stage is not None else ""
            lines.append(f"  {ckpt.tag}{mark}: iteration {ckpt.iteration}, {ckpt.degrees},{stage} {ckpt.dtype}, "
                         f"{len(ckpt.params)} params ({_size(ckpt.param_bytes)}), {len(ckpt.files)} files "
                         f"({_size(ckpt.total_bytes)})")
            if ckpt.optimizer:
                lines.append(f"      optimizer: {ckpt.optimizer}; states: {', '.join(ckpt.optimizer_states) or '-'}")
            for w in ckpt.warnings:
                lines.append(f"      warning: {w}")
            chosen = (ckpt.iteration == args.iteration) if args.iteration is not None else (
                ckpt.latest or len(run.iterations) == 1)
            if args.params and chosen:
                lines.extend(_param_table(ckpt))
    if args.json:
        print(json.dumps({"checkpoints": docs, "errors": errors}, indent=2))
    else:
        print("\n".join(lines))
    return EXIT_PROBLEMS if errors else EXIT_OK


def _param_table(ckpt: Any) -> list[str]:
    rows = [("name", "shape", "shard", "rule", "dtype", "size", "")]
    for p in ckpt.params:
        shards = sorted({tuple(s.shape) for s in p.shards})
        shard = "×".join(map(str, shards[0])) if len(shards) == 1 else "varies"
        note = "frozen" if p.frozen else (f"tied to {p.tied_to}" if p.tied_to else "")
        if p.flags:
            note = (note + " " + "; ".join(p.flags)).strip()
        rows.append((p.name, "×".join(map(str, p.shape)) or "scalar", shard, p.rule, p.dtype, _size(p.nbytes), note))
    widths = [max(len(r[i]) for r in rows) for i in range(6)]
    return ["    " + "  ".join(c.ljust(w) for c, w in zip(r[:6], widths)) + ("  " + r[6] if r[6] else "")
            for r in rows]


# -- check -------------------------------------------------------------------------------------------
def cmd_check(args: argparse.Namespace) -> int:
    from engine.check import check_root

    problems, count = check_root(args.path, compare_replicas=not args.no_replicas)
    for p in problems:
        print(p)
    if count == 0:
        print(f"ckpt-explorer: no checkpoints found under {args.path}", file=sys.stderr)
        return EXIT_PROBLEMS
    print(f"{count} iteration(s) checked, {len(problems)} problem(s)", file=sys.stderr)
    return EXIT_PROBLEMS if problems else EXIT_OK


# -- convert / reshard -------------------------------------------------------------------------------
def resolve_source(path: str, tag: str | None = None, iteration: int | None = None) -> Any:
    from engine import discover, pick_iteration, read_checkpoint
    from engine.errors import CheckpointError

    runs = discover(path)
    here = [r for r in runs if os.path.abspath(r.root) == os.path.abspath(path)]
    if not here:
        here = [r for r in runs if any(os.path.abspath(i.path) == os.path.abspath(path) for i in r.iterations)]
    candidates = here or runs
    if not candidates:
        raise CheckpointError(path, "no checkpoint found here")
    if len(candidates) > 1:
        raise CheckpointError(path, f"{len(candidates)} checkpoint runs found; point at one of: "
                                    + ", ".join(r.root for r in candidates[:5]))
    run = candidates[0]
    ref = next((i for i in run.iterations if os.path.abspath(i.path) == os.path.abspath(path)), None)
    if ref is None:
        ref = pick_iteration(run, iteration=iteration, tag=tag)
    return read_checkpoint(ref)


def target_from_args(args: argparse.Namespace, ckpt: Any) -> Any:
    from engine.plan import DTYPES, Target

    if args.command == "convert":
        return Target(kind=args.to, dtype=DTYPES[args.dtype] if args.dtype else None,
                      max_shard_size=args.max_shard_size, strict=args.strict)
    return Target(kind="reshard", tp=args.tp, pp=args.pp or ckpt.degrees.pp, quantize=args.quantize,
                  groups=args.groups, mlp_extra_grouping=not args.no_mlp_extra_grouping, strict=args.strict)


def print_plan(plan: Any, dst: str) -> None:
    import shutil

    from engine.plan import item_tensor_rows

    print(f"plan: {plan.source_path} [{plan.source_format}, {plan.source_degrees}] -> {plan.target.describe()}")
    print(f"      into {dst} ({plan.target_degrees})")
    rows = [("item", "rule", "target shapes", "read", "write", "flags")]
    for item in plan.all_items:
        shapes = " | ".join("×".join(map(str, s)) or "scalar" for s in item.target_shapes[:4])
        if len(item.target_shapes) > 4:
            shapes += f" … ({len(item.target_shapes)} ranks)"
        rows.append((item.name, item.rule, shapes, _size(item.read_bytes), _size(item.write_bytes),
                     "; ".join(item.flags)))
        for name, label, local in item_tensor_rows(item):  # a file item of a reshard: one row per tensor
            rows.append(("  · " + name, label, "×".join(map(str, local)) if local else "", "", "", ""))
    widths = [min(max(len(r[i]) for r in rows), 60) for i in range(5)]
    for r in rows:
        print("  " + "  ".join(c[:60].ljust(w) for c, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else ""))
    parent = os.path.dirname(os.path.abspath(dst)) or "."
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    free = shutil.disk_usage(parent).free
    print(f"totals: {len(plan.all_items)} items; read {_size(plan.read_bytes)}, write {_size(plan.write_bytes)}; "
          f"disk needed {_size(plan.disk_needed)} (free {_size(free)}); peak memory per worker ≈ "
          f"{_size(plan.peak_memory)}")
    if plan.flagged:
        print(f"flagged: {len(plan.flagged)} parameter(s) (see flags above)")
    for w in plan.warnings:
        print(f"warning: {w}")


def cmd_convert(args: argparse.Namespace) -> int:
    from engine.execute import Cancelled, execute_plan
    from engine.plan import plan_conversion

    ckpt = resolve_source(args.src, tag=args.tag, iteration=args.iteration)
    plan = plan_conversion(ckpt, target_from_args(args, ckpt))
    if args.dry_run:
        print_plan(plan, args.dst)
        return EXIT_OK
    executor = None
    if args.scheduler:
        from engine.dask_executor import make_executor

        executor = make_executor(args.scheduler, args.workers)
    cancel = threading.Event()
    bar = _ProgressBar(disabled=args.quiet)
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()
        bar.write("stopping after the items in flight (Ctrl-C again to abort)…")

    signal.signal(signal.SIGINT, on_sigint)
    try:
        result = execute_plan(plan, args.dst, workers=args.workers, overwrite=args.overwrite, resume=args.resume,
                              on_event=bar, cancel=cancel, executor=executor)
    except Cancelled:
        bar.close()
        print(f"ckpt-explorer: stopped; run the same command with --resume to finish into {args.dst}",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGINT, previous)
        bar.close()
    print(result.summary)
    if plan.target.kind == "reshard" and plan.target.quantize:
        print_quant_report(result.dst)
    for w in plan.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return EXIT_OK


def print_quant_report(dst: str) -> None:
    """The per-weight int8 dequantization errors the reshard recorded in each rank file's quantization entry."""
    from engine.quantize import QUANT_ENTRY
    from engine.safe_unpickle import load_torch_metadata

    rows = []
    for d, _, files in sorted(os.walk(dst)):
        for f in sorted(files):
            if not f.endswith(".pt"):
                continue
            obj = load_torch_metadata(os.path.join(d, f)).obj
            entry = obj.get(QUANT_ENTRY) if isinstance(obj, dict) else None
            for name, e in ((entry or {}).get("errors") or {}).items():
                rows.append((os.path.relpath(os.path.join(d, f), dst), name, e["max"], e["mean"], e["bound"]))
    if not rows:
        return
    print(f"int8 dequantization error ({len(rows)} weights; bound = max|w|/127):")
    width = min(max(len(r[1]) for r in rows), 70)
    print(f"  {'file':<32}  {'weight':<{width}}  {'max abs':>10}  {'mean abs':>10}  {'bound':>10}")
    for file, name, mx, mean, bound in rows:
        print(f"  {file[-32:]:<32}  {name[-width:]:<{width}}  {mx:>10.3e}  {mean:>10.3e}  {bound:>10.3e}")
    worst = max(rows, key=lambda r: r[2] / r[4] if r[4] else 0.0)
    print(f"worst: {worst[1]} max error {worst[2]:.3e} = {worst[2] / worst[4]:.3f} of its bound"
          if worst[4] else f"worst: {worst[1]} max error {worst[2]:.3e}")


class _ProgressBar:
    """tqdm over the engine's progress events (bytes, rate, ETA; the current items as postfix)."""

    def __init__(self, disabled: bool = False) -> None:
        self.disabled = disabled
        self.bar: Any = None
        self.current: dict[int | None, str] = {}
        self.done = 0

    def __call__(self, event: Any) -> None:
        from engine.progress import EventKind

        if self.disabled:
            return
        if event.kind == EventKind.PLAN:
            from tqdm import tqdm

            tqdm.monitor_interval = 0  # no monitor thread: the worker pool can then fork instead of spawning
            self.bar = tqdm(total=event.overall_total, unit="B", unit_scale=True, unit_divisor=1024,
                            desc="converting", dynamic_ncols=True, file=sys.stderr)
        elif self.bar is None:
            return
        elif event.kind in (EventKind.ITEM_DONE, EventKind.ITEM_SKIPPED):
            self.bar.update(max(0, event.overall_done - self.done))
            self.done = event.overall_done
            self.bar.set_postfix_str(f"{event.items_done}/{event.items_total} items", refresh=False)
        elif event.kind == EventKind.ITEM_START:
            self.current[event.worker] = event.item or ""
        elif event.kind == EventKind.LOG:
            self.bar.write(event.message)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


if __name__ == "__main__":
    sys.exit(main())
