"""Run plan items on a Dask cluster: a path check on every worker first, progress as worker events, lost workers re-run.

`DaskExecutor` implements `engine.execute.ItemExecutor`; `execute_plan` still owns the temporary output root, the
journal and the atomic rename, so every worker must see the source files and the output root at the same paths (a
shared filesystem). Each task calls `engine.execute.run_item`, which is idempotent (temporary file, then rename),
so an item whose worker dies is simply run again elsewhere.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields, is_dataclass
from typing import TYPE_CHECKING, Any

from .atomic import sweep_temporaries
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
RESULT = "result"  # the event that carries a task's result
RESULT_TIMEOUT = 10.0  # seconds to fetch a result whose event did not arrive before its worker left
WINDOW_PER_THREAD, WINDOW_EXTRA = 2, 2  # items in flight = 2 per worker thread + 2

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


def _task(item: PlanItem, root: str, topic: str, token: str, key: str) -> list[Any]:
    """One plan item on a worker. The result, [status, bytes, path, problem] with status ok | skipped | error, is also
    sent as an event tagged with `key`, so the client has it even if this worker is gone before it could be fetched;
    a CheckpointError travels as its path and problem because the exception does not survive pickling."""
    from distributed import get_worker

    worker = get_worker()
    address = worker.address
    if token in _stopped:
        result: list[Any] = ["skipped", 0, None, None]
    else:
        worker.log_event(topic, [EventKind.ITEM_START.value, address, item.id, 0, item.write_bytes])
        last = time.monotonic()

        def report(done: int) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL:
                last = now
                worker.log_event(topic, [EventKind.ITEM_PROGRESS.value, address, item.id, int(done),
                                         item.write_bytes])

        try:
            result = ["ok", run_item(item, root, report), None, None]
        except CheckpointError as exc:
            result = ["error", 0, exc.path, exc.problem]
    worker.log_event(topic, [RESULT, address, key, *result])
    return result


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
        start_workers = self._wait_for_workers(emit)
        if cancel.is_set():
            raise Cancelled()
        if self.check_paths:
            self.check(items, root)
        _Run(self, items, root, emit, cancel, on_done, start_workers).execute()


class _Run:
    """One DaskExecutor.run: the futures in flight, attempts per item, progress, and why it stopped.

    It stops for one of three reasons: `cancel` (Cancelled), an item's error (raised as is, and execute_plan removes
    the temporary output), or the cluster going away (no workers for `worker_timeout`, the scheduler lost): that is
    reported as a LOG event and raised as Cancelled, so the temporary output survives for --resume.
    """

    def __init__(self, ex: DaskExecutor, items: list[PlanItem], root: str, emit: Emit, cancel: threading.Event,
                 on_done: Callable[[PlanItem, int], None], start_workers: dict[str, int]) -> None:
        self.ex, self.client, self.items, self.root = ex, ex.client, items, root
        self.emit, self.cancel, self.on_done = emit, cancel, on_done
        self.start_workers = start_workers
        self.token = uuid.uuid4().hex[:12]
        self.topic = f"ckpt-explorer-{self.token}"
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("event", msg) from workers, ("done", future)
        self.index = {address: i for i, address in enumerate(sorted(start_workers))}
        self.by_key: dict[str, PlanItem] = {}
        self.attempts: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self.finished: set[str] = set()
        self.results: dict[str, list[Any]] = {}  # future key -> result, from RESULT events
        self.pending: set[Future] = set()
        self.failure: BaseException | None = None
        self.interrupted: str | None = None
        self.window = self._window(start_workers)
        self.watched = time.monotonic()
        self.no_workers_since: float | None = None

    # -- driving
    def execute(self) -> None:
        todo = sorted(self.items, key=lambda i: -i.write_bytes)  # largest first, as the local pool does
        pos = 0
        self.client.subscribe_topic(self.topic, lambda ev: self.inbox.put(("event", ev[1])))
        try:
            while True:
                if time.monotonic() - self.watched > 2.0:
                    self._watch()
                while pos < len(todo) and len(self.pending) < self.window and not self._stopping():
                    self._submit(todo[pos])
                    pos += 1
                if not self.pending:
                    break
                if self._stopping():
                    self._drain()
                    break
                self._pump(0.2)
        finally:
            if self.pending:  # leaving on an exception of our own (a failing callback, KeyboardInterrupt)
                self._abandon()
            self._pump_events()
            try:
                self.client.unsubscribe_topic(self.topic)
            except Exception:  # the scheduler may be gone; nothing left to unsubscribe from
                pass
        if self.failure is not None:
            raise self.failure
        if self.interrupted is not None:
            self.emit(ProgressEvent(EventKind.LOG, message=f"stopped: {self.interrupted}"))
            raise Cancelled(self.interrupted)
        if len(self.finished) < len(self.items):
            if self.cancel.is_set():
                raise Cancelled()
            raise CheckpointError(self.ex.address, f"{len(self.items) - len(self.finished)} items did not run")
        self._sweep()

    @staticmethod
    def _window(nthreads: dict[str, int]) -> int:
        """Items in flight: enough to hide the client-scheduler-worker round trip, few enough to stop quickly."""
        return WINDOW_PER_THREAD * max(1, sum(nthreads.values())) + WINDOW_EXTRA

    def _stopping(self) -> bool:
        return self.cancel.is_set() or self.failure is not None or self.interrupted is not None

    def _submit(self, item: PlanItem) -> None:
        n = self.attempts[item.id] = self.attempts.get(item.id, 0) + 1
        key = f"ckpt-explorer-{self.token}-{n}-{item.id}"
        fut = self.client.submit(_task, item, self.root, self.topic, self.token, key, key=key, pure=False)
        self.by_key[key] = item
        self.pending.add(fut)
        fut.add_done_callback(lambda f: self.inbox.put(("done", f)))

    def _pump(self, timeout: float) -> None:
        """Handle the next message (waiting up to `timeout`), then everything already queued."""
        try:
            self._handle(*self.inbox.get(timeout=timeout))
        except queue.Empty:
            return
        while True:
            try:
                self._handle(*self.inbox.get_nowait())
            except queue.Empty:
                return

    def _pump_events(self) -> None:
        while True:
            try:
                kind, payload = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "event":
                self._handle(kind, payload)

    def _watch(self) -> None:
        """Follow a cluster that scales; notice when it has no workers left or the scheduler is gone."""
        self.watched = time.monotonic()
        try:
            nthreads = self.ex._nthreads()
        except Exception as exc:  # any failure to reach the scheduler
            self.interrupted = f"lost the Dask scheduler {self.ex.address} ({exc}); finish with --resume"
            return
        self.window = self._window(nthreads)
        if nthreads:
            self.no_workers_since = None
        elif self.no_workers_since is None:
            self.no_workers_since = time.monotonic()
            self.emit(ProgressEvent(EventKind.LOG, message="no Dask workers left; waiting for new ones"))
        elif time.monotonic() - self.no_workers_since > self.ex.worker_timeout:
            self.interrupted = (f"no Dask workers for {self.ex.worker_timeout:.0f} s; start workers and finish "
                                "with --resume")

    # -- messages
    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "event":
            self._on_event(payload)
        else:
            self._on_future(payload)

    def _on_event(self, payload: list[Any]) -> None:
        if payload[0] == RESULT:
            self.results[payload[2]] = payload[3:]
            return
        ev_kind, address, item_id, done, total = payload
        if item_id in self.finished:
            return  # a late progress event of an item already reported done
        if ev_kind == EventKind.ITEM_START.value:
            self.starts[item_id] = self.starts.get(item_id, 0) + 1
        worker = self.index.setdefault(address, len(self.index))
        self.emit(ProgressEvent(EventKind(ev_kind), worker=worker, item=item_id, bytes_done=done, bytes_total=total))

    def _on_future(self, fut: Future) -> None:
        from distributed import KilledWorker

        if fut not in self.pending:
            return
        self.pending.discard(fut)
        item = self.by_key.pop(fut.key)
        if fut.status == "finished":
            result = self.results.pop(fut.key, None) or self._fetch(fut)
            if result is None:  # finished, but its worker left with the result: the item runs again
                if not self._stopping():
                    self._submit(item)
            elif result[0] == "ok":
                self.finished.add(item.id)
                self.on_done(item, result[1])
            elif result[0] == "error":
                self.failure = self.failure or CheckpointError(result[2], result[3])
        elif fut.status == "error":
            exc = fut.exception()
            if not isinstance(exc, KilledWorker):
                self.failure = self.failure or exc
            elif self._stopping():
                pass  # stopping anyway: the item stays undone, for --resume
            elif self.attempts[item.id] <= self.ex.max_resubmits:
                self.emit(ProgressEvent(EventKind.LOG, message=f"{item.name}: its Dask workers died; running it again"))
                self._submit(item)
            else:
                self.failure = self.failure or CheckpointError(
                    item.name, f"killed a Dask worker on each of its {self.attempts[item.id]} attempts (out of memory? "
                               f"it needs about {item.peak_bytes:,} bytes)")
        elif not self.cancel.is_set():  # cancelled by the scheduler: it was restarted or lost
            self.interrupted = self.interrupted or (f"the Dask scheduler {self.ex.address} dropped the task for "
                                                    f"{item.name} ({fut.status}); finish with --resume")

    def _fetch(self, fut: Future) -> list[Any] | None:
        """A result whose event has not arrived: wait for the event a little, then ask the worker that holds it."""
        deadline = time.monotonic() + 1.0
        deferred: list[tuple[str, Any]] = []
        while fut.key not in self.results and time.monotonic() < deadline:
            try:
                kind, payload = self.inbox.get(timeout=0.05)
            except queue.Empty:
                continue
            if kind == "event":
                self._on_event(payload)
            else:
                deferred.append((kind, payload))
        for message in deferred:
            self.inbox.put(message)
        if fut.key in self.results:
            return self.results.pop(fut.key)
        try:
            return list(fut.result(timeout=RESULT_TIMEOUT))
        except Exception:  # the worker that holds it is gone
            return None

    # -- stopping and cleaning up
    def _drain(self) -> None:
        """After cancel or a failure: tasks not yet started return at once and running ones finish (and are
        journaled), so nothing of this run writes into the output root once `run` returns."""
        if self.interrupted is None:
            try:
                self.client.run(_stop_token, self.token, on_error="ignore")
            except Exception:  # workers that cannot be told will still be waited for
                pass
            deadline = time.monotonic() + self.ex.drain_timeout
            while self.pending and time.monotonic() < deadline and self.interrupted is None:
                self._pump(0.2)
                if time.monotonic() - self.watched > 2.0:
                    self._watch()
        if self.pending:
            self._abandon()

    def _abandon(self) -> None:
        """Stop what is still in flight without waiting: unstarted tasks are dropped, running ones run on."""
        try:
            if self.interrupted is None:  # else the workers or the scheduler are gone: nobody to tell
                self.client.run(_stop_token, self.token, on_error="ignore")
            self.client.cancel(list(self.pending), force=True)
        except Exception:  # the scheduler may be gone
            pass
        self.pending.clear()

    def _sweep(self) -> None:
        """Remove temporary files that workers which died mid-item left beside the outputs."""
        rerun = [i for i in self.items if self.starts.get(i.id, 0) > 1 or self.attempts.get(i.id, 0) > 1]
        lost = set(self.start_workers) - set(self.ex._nthreads())
        if not (rerun or lost):
            return
        removed = sweep_temporaries(self.root)
        if removed:
            self.emit(ProgressEvent(EventKind.LOG, message=f"removed {removed} temporary files left by lost Dask "
                                                           "workers"))


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
