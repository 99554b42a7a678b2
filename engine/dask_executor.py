"""Run plan items on a Dask cluster: a path check on every worker first, progress as worker events, lost workers re-run.

`DaskExecutor` implements `engine.execute.ItemExecutor`; `execute_plan` still owns the temporary output root, the
journal and the atomic rename, so every worker must see the source files and the output root at the same paths (a
shared filesystem). Each task calls `engine.execute.run_item`, which is idempotent (temporary file, then rename),
so an item whose worker dies is simply run again elsewhere.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Any

from .errors import CheckpointError, PlanError
from .execute import Cancelled, Emit, ItemExecutor, LocalPoolExecutor, run_item
from .layout import Param
from .plan import PlanItem
from .progress import EventKind, ProgressEvent
from .tensorref import TensorRef

if TYPE_CHECKING:
    from distributed import Client, Future

INSTALL_HINT = "running on a Dask cluster needs the 'distributed' package: install ckpt-explorer[dask]"
CHECK_SAMPLE = 256  # input files each worker opens before any work
PROGRESS_INTERVAL = 0.25  # seconds between two ITEM_PROGRESS events of one task
MARKER = ".ckpt-explorer-check"

_stopped: set[str] = set()  # run tokens a client has stopped (worker-process state, set through client.run)


# -- worker side -------------------------------------------------------------------------------------
def _check_worker(sources: list[str], root: str, marker: str, token: str) -> tuple[str, str] | None:
    """On one worker: can it read `sources`, see the client's marker in `root`, and create a file there?"""
    for path in sources:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            return path, f"cannot read it ({exc.strerror or exc})"
    try:
        with open(os.path.join(root, marker), encoding="utf-8") as fh:
            seen = fh.read()
    except OSError as exc:
        return root, f"cannot see the output root ({exc.strerror or exc})"
    if seen != token:
        return root, "sees a different directory at this path (the output root is not on a shared filesystem)"
    probe = os.path.join(root, f"{marker}.{socket.gethostname()}.{os.getpid()}")
    try:
        with open(probe, "w", encoding="utf-8") as fh:
            fh.write(token)
        os.remove(probe)
    except OSError as exc:
        return root, f"cannot create files in the output root ({exc.strerror or exc})"
    return None


def _stop_token(token: str) -> None:
    _stopped.add(token)


def _task(item: PlanItem, root: str, topic: str, token: str) -> tuple[Any, ...]:
    """One plan item on a worker: ("ok", bytes, address) | ("skipped", 0, address) | ("error", 0, address, path,
    problem). CheckpointError travels as data because it does not survive pickling."""
    from distributed import get_worker

    worker = get_worker()
    address = worker.address
    if token in _stopped:
        return "skipped", 0, address
    worker.log_event(topic, [EventKind.ITEM_START.value, address, item.id, 0, item.write_bytes])
    last = time.monotonic()

    def report(done: int) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last >= PROGRESS_INTERVAL:
            last = now
            worker.log_event(topic, [EventKind.ITEM_PROGRESS.value, address, item.id, int(done), item.write_bytes])

    try:
        written = run_item(item, root, report)
    except CheckpointError as exc:
        return "error", 0, address, exc.path, exc.problem
    return "ok", written, address


# -- client side -------------------------------------------------------------------------------------
def _paths_in(value: Any, depth: int = 0) -> Iterator[str]:
    """Input file paths named by a plan item's param or args (absolute paths that exist here)."""
    if depth > 4:
        return
    if isinstance(value, TensorRef):
        yield value.file
    elif isinstance(value, Param):
        for frag in value.fragments:
            yield frag.tensor.file
    elif isinstance(value, str):
        if os.path.isabs(value) and os.path.isfile(value):
            yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _paths_in(v, depth + 1)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _paths_in(v, depth + 1)
    elif is_dataclass(value) and not isinstance(value, type):
        for f in fields(value):
            yield from _paths_in(getattr(value, f.name), depth + 1)


def sample_sources(items: Iterable[PlanItem], limit: int = CHECK_SAMPLE) -> list[str]:
    """Distinct input files of `items`, evenly sampled down to `limit` (first and last always kept)."""
    seen: dict[str, None] = {}
    for item in items:
        if item.param is not None:
            for path in _paths_in(item.param):
                seen.setdefault(path, None)
        for path in _paths_in(item.args):
            seen.setdefault(path, None)
    paths = list(seen)
    if len(paths) <= limit:
        return paths
    step = (len(paths) - 1) / (limit - 1)
    return [paths[round(i * step)] for i in range(limit)]


def _sweep_temporaries(items: Iterable[PlanItem], root: str) -> int:
    """Remove `<output>.tmp<pid>` files a killed worker left beside outputs; returns how many."""
    by_dir: dict[str, set[str]] = {}
    for item in items:
        for rel in item.outputs:
            path = os.path.join(root, rel)
            by_dir.setdefault(os.path.dirname(path), set()).add(os.path.basename(path))
    removed = 0
    for folder, names in by_dir.items():
        try:
            entries = os.listdir(folder)
        except OSError:
            continue
        for entry in entries:
            m = re.fullmatch(r"(.+)\.tmp\d+", entry)
            if m and m.group(1) in names:
                try:
                    os.remove(os.path.join(folder, entry))
                    removed += 1
                except OSError:
                    pass
    return removed


class DaskExecutor(ItemExecutor):
    """Runs plan items as Dask tasks on the workers of an existing scheduler (or of a given `Client`)."""

    def __init__(self, scheduler: str | Client, *, check_paths: bool = True, min_workers: int = 1,
                 worker_timeout: float = 300.0, max_resubmits: int = 2, drain_timeout: float = 600.0,
                 connect_timeout: float = 30.0) -> None:
        try:
            from distributed import Client
        except ImportError as exc:
            raise PlanError(INSTALL_HINT) from exc
        self.check_paths = check_paths
        self.min_workers = max(1, min_workers)
        self.worker_timeout = worker_timeout
        self.max_resubmits = max_resubmits
        self.drain_timeout = drain_timeout
        if isinstance(scheduler, Client):
            self.client, self._owns_client = scheduler, False
            self.address = str(scheduler.scheduler.address if scheduler.scheduler else scheduler)
            return
        self.address = scheduler
        try:
            if os.path.isfile(scheduler):
                self.client = Client(scheduler_file=scheduler, timeout=connect_timeout, set_as_default=False)
            else:
                self.client = Client(scheduler, timeout=connect_timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise CheckpointError(scheduler, f"cannot connect to the Dask scheduler ({exc})") from exc
        self._owns_client = True

    # -- cluster state
    def _nthreads(self) -> dict[str, int]:
        return dict(self.client.nthreads())

    @property  # type: ignore[override]
    def workers(self) -> int:
        """Number of Dask workers connected now."""
        return len(self._nthreads())

    def close(self) -> None:
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> DaskExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wait_for_workers(self, emit: Emit) -> dict[str, int]:
        nthreads = self._nthreads()
        if len(nthreads) >= self.min_workers:
            return nthreads
        emit(ProgressEvent(EventKind.LOG, message=f"waiting for {self.min_workers} Dask workers "
                                                  f"({len(nthreads)} connected to {self.address})"))
        try:
            self.client.wait_for_workers(self.min_workers, timeout=self.worker_timeout)
        except TimeoutError as exc:
            raise CheckpointError(self.address, f"only {len(self._nthreads())} of {self.min_workers} Dask workers "
                                                f"joined within {self.worker_timeout:.0f} s") from exc
        return self._nthreads()

    # -- the path check
    def check(self, items: list[PlanItem], root: str) -> None:
        """Raise CheckpointError unless every worker can read a sample of the inputs and write into `root`."""
        token = uuid.uuid4().hex
        marker = f"{MARKER}-{token[:12]}"
        marker_path = os.path.join(root, marker)
        with open(marker_path, "w", encoding="utf-8") as fh:
            fh.write(token)
        try:
            results = self.client.run(_check_worker, sample_sources(items), root, marker, token, on_error="return")
        finally:
            os.remove(marker_path)
        failures: list[tuple[str, str, str]] = []
        for address, result in sorted(results.items()):
            if isinstance(result, BaseException):
                failures.append((address, address, f"cannot run ckpt-explorer's check there ({type(result).__name__}: "
                                                   f"{result}); install the same ckpt-explorer on every worker"))
            elif result is not None:
                path, problem = result
                failures.append((address, path, problem))
        if failures:
            address, path, problem = failures[0]
            more = f" (and {len(failures) - 1} more workers)" if len(failures) > 1 else ""
            raise CheckpointError(path, f"Dask worker {address} {problem}{more}; every worker needs the source and "
                                        "the output on a shared filesystem at the same paths")

    # -- the run
    def run(self, items: list[PlanItem], root: str, emit: Emit, cancel: threading.Event,
            on_done: Callable[[PlanItem, int], None]) -> None:
        if not items:
            return
        from distributed import KilledWorker

        start_workers = self._wait_for_workers(emit)
        if cancel.is_set():
            raise Cancelled()
        if self.check_paths:
            self.check(items, root)
        token = uuid.uuid4().hex[:12]
        topic = f"ckpt-explorer-{token}"
        inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("event", msg) from the scheduler, ("done", future)
        index: dict[str, int] = {addr: i for i, addr in enumerate(sorted(start_workers))}
        self.client.subscribe_topic(topic, lambda ev: inbox.put(("event", ev[1])))
        todo = sorted(items, key=lambda i: -i.write_bytes)  # largest first, as the local pool does
        by_key: dict[str, PlanItem] = {}
        attempts: dict[str, int] = {}
        starts: dict[str, int] = {}
        finished: set[str] = set()
        pending: set[Future] = set()
        failure: BaseException | None = None
        pos = 0
        slots = max(1, sum(start_workers.values()))
        slots_at = time.monotonic()

        def worker_index(address: str) -> int:
            return index.setdefault(address, len(index))

        def submit(item: PlanItem) -> None:
            n = attempts[item.id] = attempts.get(item.id, 0) + 1
            key = f"ckpt-explorer-{token}-{n}-{item.id}"
            fut = self.client.submit(_task, item, root, topic, token, key=key, pure=False)
            by_key[key] = item
            pending.add(fut)
            fut.add_done_callback(lambda f: inbox.put(("done", f)))

        def handle(kind: str, payload: Any) -> None:
            nonlocal failure
            if kind == "event":
                ev_kind, address, item_id, done, total = payload
                if item_id in finished:
                    return  # a late progress event of an item already reported done
                if ev_kind == EventKind.ITEM_START.value:
                    starts[item_id] = starts.get(item_id, 0) + 1
                emit(ProgressEvent(EventKind(ev_kind), worker=worker_index(address), item=item_id, bytes_done=done,
                                   bytes_total=total))
                return
            fut = payload
            if fut not in pending:
                return
            pending.discard(fut)
            item = by_key.pop(fut.key)
            if fut.status == "finished":
                result = fut.result()
                if result[0] == "ok":
                    finished.add(item.id)
                    on_done(item, result[1])
                elif result[0] == "error" and failure is None:
                    failure = CheckpointError(result[3], result[4])
            elif fut.status == "error":
                exc = fut.exception()
                if isinstance(exc, KilledWorker) and attempts[item.id] <= self.max_resubmits and failure is None \
                        and not cancel.is_set():
                    emit(ProgressEvent(EventKind.LOG, message=f"{item.name}: its Dask workers died; running it again"))
                    submit(item)
                elif isinstance(exc, KilledWorker):
                    failure = failure or CheckpointError(item.name, f"killed a Dask worker on each of its {attempts[item.id]} attempts "
                                                                    f"(out of memory? it needs about "
                                                                    f"{item.peak_bytes:,} bytes)")
                else:
                    failure = failure or exc
            else:  # cancelled by someone else, or the scheduler was lost
                failure = failure or CheckpointError(self.address, f"Dask task for {item.name} was {fut.status}")

        try:
            while True:
                if time.monotonic() - slots_at > 2.0:  # follow a cluster that scales up or down
                    slots, slots_at = max(1, sum(self._nthreads().values())), time.monotonic()
                while pos < len(todo) and len(pending) < 2 * slots and failure is None and not cancel.is_set():
                    submit(todo[pos])
                    pos += 1
                if not pending:
                    break
                if cancel.is_set() or failure is not None:
                    self._drain(token, pending, inbox, handle)
                    break
                try:
                    handle(*inbox.get(timeout=0.2))
                except queue.Empty:
                    continue
                while True:  # handle everything already queued before submitting more
                    try:
                        handle(*inbox.get_nowait())
                    except queue.Empty:
                        break
        finally:
            self._drain_events(inbox, handle)
            self.client.unsubscribe_topic(topic)
        if failure is not None:
            raise failure
        if len(finished) < len(items):
            if cancel.is_set():
                raise Cancelled()
            raise CheckpointError(self.address, f"{len(items) - len(finished)} items did not run on the Dask cluster")
        rerun = [i for i in items if starts.get(i.id, 0) > 1 or attempts.get(i.id, 0) > 1]
        lost = set(start_workers) - set(self._nthreads())
        removed = _sweep_temporaries(items if lost else rerun, root) if (rerun or lost) else 0
        if removed:
            emit(ProgressEvent(EventKind.LOG, message=f"removed {removed} temporary files left by lost Dask workers"))

    def _drain(self, token: str, pending: set[Future], inbox: queue.SimpleQueue,
               handle: Callable[[str, Any], None]) -> None:
        """After cancel or a failure: tasks not yet started return at once, running ones finish (and are journaled),
        so nothing of this run writes into the output root once `run` returns."""
        self.client.run(_stop_token, token, on_error="ignore")
        deadline = time.monotonic() + self.drain_timeout
        while pending and time.monotonic() < deadline:
            try:
                handle(*inbox.get(timeout=0.2))
            except queue.Empty:
                continue
        if pending:
            self.client.cancel(list(pending), force=True)
            pending.clear()

    @staticmethod
    def _drain_events(inbox: queue.SimpleQueue, handle: Callable[[str, Any], None]) -> None:
        while True:
            try:
                kind, payload = inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "event":
                handle(kind, payload)


def make_executor(scheduler: str | None, workers: int | None) -> ItemExecutor:
    """The executor the CLI asked for: a local process pool, or the Dask cluster at `scheduler` (an address such as
    tcp://host:8786, or a scheduler file); with a scheduler, `workers` is how many Dask workers to wait for."""
    if scheduler is None:
        return LocalPoolExecutor(workers)
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise PlanError(INSTALL_HINT) from exc
    return DaskExecutor(scheduler, min_workers=workers or 1)
