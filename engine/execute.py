"""Run a plan: a temporary sibling output, a journal for --resume, a worker pool, progress events, atomic rename.

The executor interface is `ItemExecutor.run(items, root, emit, cancel)`; `LocalPoolExecutor` (processes on
this machine) and `engine.dask_executor.DaskExecutor` (a Dask cluster) implement it. Both call
`run_item`, which dispatches on `PlanItem.kind`.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import queue
import shutil
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass

from .atomic import sweep_temporaries, temp_path
from .errors import CheckpointError, OutputExistsError
from .plan import Plan, PlanItem
from .progress import EventKind, ProgressCallback, ProgressEvent
from .verify import verify_file, verify_output

JOURNAL = ".ckpt-explorer-journal.jsonl"
PARTIAL_SUFFIX = ".ckpt-explorer-partial"


class Cancelled(Exception):
    """The run was stopped on request; its temporary output is kept so --resume can finish it."""


@dataclass(frozen=True)
class ExecResult:
    dst: str
    items_done: int
    items_skipped: int
    bytes_written: int
    seconds: float
    verified: bool
    summary: str


# -- item dispatch (runs in workers) ---------------------------------------------------------------
def _copy_file(item: PlanItem, root: str, report: Callable[[int], None] | None = None) -> int:
    dst = os.path.join(root, item.outputs[0])
    tmp = temp_path(dst)
    shutil.copyfile(item.args["src"], tmp)
    os.replace(tmp, dst)
    return os.path.getsize(dst)


def _write_file(item: PlanItem, root: str, report: Callable[[int], None] | None = None) -> int:
    dst = os.path.join(root, item.outputs[0])
    tmp = temp_path(dst)
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(item.args["text"])
    os.replace(tmp, dst)
    return len(item.args["text"])


def _runner(kind: str) -> Callable[..., int]:
    if kind == "copy":
        return _copy_file
    if kind == "write_file":
        return _write_file
    if kind == "universal_param":
        from .writers.universal import write_universal_param

        return write_universal_param
    if kind == "universal_optimizer_state":
        from .writers.universal import write_optimizer_state

        return write_optimizer_state
    if kind in ("tensor", "safetensors_header", "safetensors_index", "torch_shard"):
        from .writers import consolidated

        return getattr(consolidated, f"write_{kind}")
    if kind.startswith("reshard_dist"):
        from .writers import torch_dist

        return getattr(torch_dist, f"write_{kind}")
    if kind.startswith("reshard"):
        from .writers import reshard

        return getattr(reshard, f"write_{kind}")
    raise CheckpointError(kind, "unknown plan item kind")


def run_item(item: PlanItem, root: str, report: Callable[[int], None] | None = None) -> int:
    """Run one plan item into output root `root`; returns the bytes it wrote. Idempotent."""
    from .torchzip import MappedFile

    for rel in item.outputs:
        os.makedirs(os.path.dirname(os.path.join(root, rel)) or root, exist_ok=True)
    try:
        return _runner(item.kind)(item, root, report)
    finally:
        MappedFile.release_pages()


# -- executors -------------------------------------------------------------------------------------
Emit = Callable[[ProgressEvent], None]


class ItemExecutor(ABC):
    """Runs independent plan items somewhere; reports ITEM_* events through `emit`; honours `cancel`."""

    workers: int = 1

    @abstractmethod
    def run(self, items: list[PlanItem], root: str, emit: Emit, cancel: threading.Event,
            on_done: Callable[..., None]) -> None:
        """Run every item; call on_done(item, bytes, worker) as each finishes. Raise Cancelled if cancelled."""


_progress_queue: mp.SimpleQueue | None = None
_worker_index = 0


def _pool_init(q: mp.SimpleQueue, counter: mp.Value) -> None:  # type: ignore[valid-type]
    global _progress_queue, _worker_index
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        os.nice(5)  # workers yield to the process that shows progress (a UI, a login shell)
    except OSError:
        pass
    _progress_queue = q
    with counter.get_lock():
        counter.value += 1
        _worker_index = counter.value - 1


def _pool_run(item: PlanItem, root: str) -> tuple[str, int, int]:
    q = _progress_queue
    if q is not None:
        q.put((EventKind.ITEM_START.value, _worker_index, item.id, 0, item.write_bytes))

    def report(done: int) -> None:
        if q is not None:
            q.put((EventKind.ITEM_PROGRESS.value, _worker_index, item.id, done, item.write_bytes))

    written = run_item(item, root, report)
    return item.id, written, _worker_index


class LocalPoolExecutor(ItemExecutor):
    """A process pool on this machine (in-process when workers == 1)."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = max(1, workers or os.cpu_count() or 1)

    def run(self, items: list[PlanItem], root: str, emit: Emit, cancel: threading.Event,
            on_done: Callable[[PlanItem, int], None]) -> None:
        if self.workers == 1 or len(items) <= 1:
            for item in items:
                if cancel.is_set():
                    raise Cancelled()
                emit(ProgressEvent(EventKind.ITEM_START, worker=0, item=item.id, bytes_total=item.write_bytes))
                written = run_item(item, root, lambda d, it=item: emit(ProgressEvent(
                    EventKind.ITEM_PROGRESS, worker=0, item=it.id, bytes_done=d, bytes_total=it.write_bytes)))
                on_done(item, written, 0)
            return
        # forkserver, not fork: forking a process whose torch already ran threaded kernels can hang the child in
        # libgomp, and a running app has threads. The server imports torch once; every worker forks from it.
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        ctx = mp.get_context(method)
        if method == "forkserver":  # torch is imported by the workers that need it (file-to-file copies do not)
            ctx.set_forkserver_preload(["engine.execute", "engine.writers.universal", "engine.writers.consolidated"])
        q = ctx.SimpleQueue()
        counter = ctx.Value("i", 0)
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set() or not q.empty():
                try:
                    if q.empty():
                        time.sleep(0.02)
                        continue
                    kind, worker, item_id, done, total = q.get()
                except (EOFError, OSError, queue.Empty):
                    break
                emit(ProgressEvent(EventKind(kind), worker=worker, item=item_id, bytes_done=done, bytes_total=total))

        pumper = threading.Thread(target=pump, name="ckpt-explorer-progress", daemon=True)
        pumper.start()
        by_id = {i.id: i for i in items}
        pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_pool_init, initargs=(q, counter))
        try:
            pending: set[Future] = set()
            todo = iter(sorted(items, key=lambda i: -i.write_bytes))
            exhausted = False
            while True:
                while not exhausted and len(pending) < self.workers * 2 and not cancel.is_set():
                    nxt = next(todo, None)
                    if nxt is None:
                        exhausted = True
                        break
                    pending.add(pool.submit(_pool_run, nxt, root))
                if not pending:
                    break
                done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                for fut in done:
                    item_id, written, worker = fut.result()
                    on_done(by_id[item_id], written, worker)
                if cancel.is_set():
                    for fut in pending:
                        fut.cancel()
                    wait(pending)
                    for fut in pending:
                        if not fut.cancelled() and fut.exception() is None:
                            item_id, written, worker = fut.result()
                            on_done(by_id[item_id], written, worker)
                    raise Cancelled()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            stop.set()
            pumper.join(timeout=2)


# -- the run ---------------------------------------------------------------------------------------
def partial_dir(dst: str) -> str:
    dst = os.path.abspath(dst)
    return os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}{PARTIAL_SUFFIX}")


def _read_journal(work: str) -> dict[str, dict]:
    path = os.path.join(work, JOURNAL)
    done: dict[str, dict] = {}
    if not os.path.exists(path):
        return done
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
                done[rec["id"]] = rec
            except (ValueError, KeyError):
                continue  # a torn last line from an interrupted run
    return done


def _still_complete(item: PlanItem, rec: dict, work: str) -> bool:
    """An item journaled as done is only skipped if every output is still there with its recorded size."""
    sizes = rec.get("sizes") or {}
    for rel in item.outputs:
        path = os.path.join(work, rel)
        if not os.path.isfile(path) or os.path.getsize(path) != sizes.get(rel, -1):
            return False
    return verify_output(item, work) is None


def execute_plan(plan: Plan, dst: str, *, workers: int | None = None, overwrite: bool = False, resume: bool = False,
                 on_event: ProgressCallback | None = None, cancel: threading.Event | None = None,
                 executor: ItemExecutor | None = None) -> ExecResult:
    """Run `plan` into `dst` (created atomically). Raises OutputExistsError, Cancelled, CheckpointError."""
    start = time.monotonic()
    dst = os.path.abspath(dst)
    emit: Emit = on_event or (lambda e: None)
    cancel = cancel or threading.Event()
    if os.path.abspath(plan.source_path).startswith(dst + os.sep) or os.path.abspath(plan.source_path) == dst:
        raise OutputExistsError(f"{dst}: the destination contains the source checkpoint")
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)) and not overwrite:
        raise OutputExistsError(f"{dst}: destination exists and is not empty (use --overwrite to replace it)")
    work = partial_dir(dst)
    if os.path.exists(work) and not resume:
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    for rel in plan.layout_dirs:
        os.makedirs(os.path.join(work, rel), exist_ok=True)
    journal_done = _read_journal(work) if resume else {}
    executor = executor or LocalPoolExecutor(workers)
    total = plan.write_bytes
    items_total = len(plan.all_items)
    state = {"bytes": 0, "items": 0, "skipped": 0}
    lock = threading.Lock()
    emit(ProgressEvent(EventKind.PLAN, overall_total=total, items_total=items_total,
                       message=f"{items_total} items, {executor.workers} workers", time=time.time()))
    journal = open(os.path.join(work, JOURNAL), "a", encoding="utf-8")

    def on_done(item: PlanItem, written: int, worker: int | None = None) -> None:
        sizes = {rel: os.path.getsize(os.path.join(work, rel)) for rel in item.outputs
                 if os.path.exists(os.path.join(work, rel))}
        with lock:
            journal.write(json.dumps({"id": item.id, "bytes": written, "sizes": sizes}) + "\n")
            journal.flush()
            state["bytes"] += item.write_bytes
            state["items"] += 1
            emit(ProgressEvent(EventKind.ITEM_DONE, worker=worker, item=item.id, bytes_done=written,
                               bytes_total=item.write_bytes, overall_done=state["bytes"], overall_total=total,
                               items_done=state["items"], items_total=items_total, time=time.time()))

    try:
        todo: list[PlanItem] = []
        for item in plan.items:
            rec = journal_done.get(item.id)
            if rec is not None and _still_complete(item, rec, work):
                state["bytes"] += item.write_bytes
                state["items"] += 1
                state["skipped"] += 1
                emit(ProgressEvent(EventKind.ITEM_SKIPPED, item=item.id, overall_done=state["bytes"],
                                   overall_total=total, items_done=state["items"], items_total=items_total))
            else:
                todo.append(item)
        if state["skipped"]:
            emit(ProgressEvent(EventKind.LOG, message=f"resume: {state['skipped']} items verified complete, skipped"))
        executor.run(todo, work, emit, cancel, on_done)
        if cancel.is_set():
            raise Cancelled()
        for item in plan.finalize:
            emit(ProgressEvent(EventKind.ITEM_START, worker=0, item=item.id, bytes_total=item.write_bytes))
            on_done(item, run_item(item, work), 0)
    except Cancelled:
        journal.close()
        emit(ProgressEvent(EventKind.CANCELLED, overall_done=state["bytes"], overall_total=total,
                           items_done=state["items"], items_total=items_total,
                           message=f"stopped; {state['items']} of {items_total} items done; finish with --resume"))
        raise
    except BaseException as exc:
        journal.close()
        emit(ProgressEvent(EventKind.ERROR, message=str(exc)))
        if not isinstance(exc, (KeyboardInterrupt,)):
            shutil.rmtree(work, ignore_errors=True)  # bad input: leave no partial output behind
        raise
    journal.close()
    problems = [p for p in (verify_output(item, work, deep=False) for item in plan.all_items) if p]
    problems += [p for p in {verify_file(os.path.join(work, rel)) for i in plan.all_items for rel in i.outputs} if p]
    shutil.rmtree(os.path.join(work, ".ckpt-explorer-done"), ignore_errors=True)
    if problems:
        shutil.rmtree(work, ignore_errors=True)
        raise CheckpointError(dst, f"verification failed: {problems[0]}")
    os.remove(os.path.join(work, JOURNAL))
    sweep_temporaries(work)  # half-written files of workers killed mid-item (their items were re-run)
    _replace(work, dst)
    seconds = time.monotonic() - start
    written = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
    summary = (f"{state['items']} items ({state['skipped']} resumed) → {dst}: {written:,} bytes in {seconds:.1f} s; "
               f"verified {len(plan.all_items)} outputs")
    emit(ProgressEvent(EventKind.DONE, overall_done=total, overall_total=total, items_done=items_total,
                       items_total=items_total, message=summary))
    return ExecResult(dst, state["items"], state["skipped"], written, seconds, True, summary)


def _replace(work: str, dst: str) -> None:
    if os.path.exists(dst):
        old = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.ckpt-explorer-old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(work, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, dst)
