"""The Dask executor on a real LocalCluster (2 worker processes, loopback) equals the local pool on real fixtures.

Worker death and an unreachable path are simulated inside real worker processes: a worker plugin makes one worker
`os._exit` halfway through writing an item (once, guarded by a marker file), and a function sent with `client.run`
hides a path from one worker's `open`; a single machine cannot give two processes different filesystems.
"""

from __future__ import annotations

import builtins
import os
import shutil
import sys
import threading

import pytest

distributed = pytest.importorskip("distributed")

import cloudpickle  # noqa: E402  (installed with distributed)
import torch  # noqa: E402
from distributed import Client, LocalCluster, WorkerPlugin  # noqa: E402
from fixture_paths import FIXTURES  # noqa: E402

import engine  # noqa: E402
from engine.dask_executor import DaskExecutor, make_executor, sample_sources  # noqa: E402
from engine.errors import CheckpointError, PlanError  # noqa: E402
from engine.execute import Cancelled, LocalPoolExecutor, execute_plan, partial_dir  # noqa: E402
from engine.plan import Plan, Target, plan_conversion  # noqa: E402
from engine.progress import EventKind, ProgressEvent  # noqa: E402
from engine.safe_unpickle import load_torch_metadata  # noqa: E402
from engine.standins import StandIn  # noqa: E402
from engine.tensor_io import read_tensor  # noqa: E402
from engine.tensorref import TensorRef  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers get this module's helpers by value

CASE = os.path.join(FIXTURES, "megatron-deepspeed", "gpt_pipe_tp2_pp2_dp1_bf16", "ckpt")


# -- helpers -----------------------------------------------------------------------------------------
def _checkpoint():
    run = [r for r in engine.discover(CASE) if r.root.endswith("ckpt")][0]
    return engine.read_checkpoint(engine.pick_iteration(run))


def _files(root: str) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _load(path: str):
    """torch.load (weights only); files naming DeepSpeed/Megatron classes go through the engine's safe reader."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return load_torch_metadata(path).obj


def _assert_same(a, b, where: str) -> None:
    if isinstance(a, TensorRef):
        a = read_tensor(a)
    if isinstance(b, TensorRef):
        b = read_tensor(b)
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, StandIn):
        assert type(b).qualname == type(a).qualname, where
        _assert_same(a.args, b.args, f"{where}.args")
        _assert_same(a.state, b.state, f"{where}.state")
    else:
        assert a == b, where


def assert_same_output(expected: str, got: str, plan: Plan) -> None:
    files = _files(expected)
    assert files == _files(got)
    outputs = {o for item in plan.all_items for o in item.outputs}
    assert outputs and outputs <= set(files)  # every planned output is there, no stray temporary file
    loaded = 0
    for rel in files:
        a, b = os.path.join(expected, rel), os.path.join(got, rel)
        if rel.endswith(".pt"):
            _assert_same(_load(a), _load(b), rel)
            loaded += 1
        else:
            assert open(a, "rb").read() == open(b, "rb").read(), rel
    assert loaded >= sum(o.endswith(".pt") for o in outputs) > 0


def _warm() -> None:
    import torch  # noqa: F401  (once per worker, outside the timed runs)


# -- simulated trouble inside worker processes ---------------------------------------------------------
class DieMidItem(WorkerPlugin):
    """The first worker to rename the second output file of `param` writes half of it and exits (once, by marker)."""

    name = "ckpt-explorer-die-mid-item"

    def __init__(self, param: str, marker: str) -> None:
        self.param = param
        self.marker = marker

    def setup(self, worker) -> None:
        real = os.replace
        param, marker = self.param, self.marker
        renamed = []

        def replace(src, dst, *args, **kwargs):
            if f"/{param}/" in str(dst):
                renamed.append(dst)
                if len(renamed) == 2:
                    try:
                        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    except FileExistsError:
                        return real(src, dst, *args, **kwargs)
                    os.close(fd)
                    os.truncate(src, os.path.getsize(src) // 2)
                    os._exit(1)
            return real(src, dst, *args, **kwargs)

        self._real = real
        os.replace = replace

    def teardown(self, worker) -> None:
        os.replace = self._real


def _hide(prefix: str) -> None:
    """On this worker, `open` fails for every path under `prefix`, as if it lacked that mount."""
    real = getattr(builtins, "_ckpt_real_open", builtins.open)
    builtins._ckpt_real_open = real

    def hidden_open(file, *args, **kwargs):
        if isinstance(file, str) and file.startswith(prefix):
            raise FileNotFoundError(2, "No such file or directory", file)
        return real(file, *args, **kwargs)

    builtins.open = hidden_open


def _unhide() -> None:
    builtins.open = getattr(builtins, "_ckpt_real_open", builtins.open)


# -- fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    with LocalCluster(n_workers=2, processes=True, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=":0") as cluster, Client(cluster, set_as_default=False) as c:
        c.gather([c.submit(_warm, workers=[w], pure=False) for w in c.nthreads()])
        yield c


@pytest.fixture(scope="module")
def universal(tmp_path_factory) -> tuple[Plan, str]:
    plan = plan_conversion(_checkpoint(), Target("universal"))
    out = str(tmp_path_factory.mktemp("local") / "out")
    execute_plan(plan, out, executor=LocalPoolExecutor(1))
    return plan, out


# -- tests -------------------------------------------------------------------------------------------
def test_universal_equals_local_pool(client, universal, tmp_path) -> None:
    plan, expected = universal
    events: list[ProgressEvent] = []
    executor = DaskExecutor(client)
    assert executor.workers == 2
    result = execute_plan(plan, str(tmp_path / "out"), executor=executor, on_event=events.append)
    assert result.items_done == len(plan.all_items)
    assert_same_output(expected, str(tmp_path / "out"), plan)
    started = {e.worker for e in events if e.kind == EventKind.ITEM_START and e.item in {i.id for i in plan.items}}
    assert started == {0, 1}  # both workers ran items and reported it back
    assert not os.path.exists(partial_dir(str(tmp_path / "out")))


def test_reshard_equals_local_pool(client, tmp_path) -> None:
    ckpt = _checkpoint()
    try:
        plan = plan_conversion(ckpt, Target("reshard", tp=1, pp=1))
    except (PlanError, ImportError) as exc:
        pytest.skip(f"no reshard planner yet (engine/plan_reshard.py): {exc}")
    try:
        execute_plan(plan, str(tmp_path / "local"), executor=LocalPoolExecutor(1))
    except ImportError as exc:
        pytest.skip(f"no reshard writer yet: {exc}")
    execute_plan(plan, str(tmp_path / "dask"), executor=DaskExecutor(client))
    assert_same_output(str(tmp_path / "local"), str(tmp_path / "dask"), plan)


@pytest.mark.parametrize("allowed_failures", [None, 0], ids=["scheduler-reruns", "killedworker-resubmit"])
def test_worker_dies_mid_item(client, universal, tmp_path, allowed_failures) -> None:
    plan, expected = universal
    params = [i for i in sorted(plan.items, key=lambda i: -i.write_bytes) if i.kind == "universal_param"]
    victim = params[len(params) // 2]  # submitted after other items have finished
    marker = str(tmp_path / "died")
    previous = client.run_on_scheduler(lambda dask_scheduler: dask_scheduler.allowed_failures)
    if allowed_failures is not None:  # the scheduler gives up on the item at once: the executor resubmits it
        client.run_on_scheduler(lambda dask_scheduler: setattr(dask_scheduler, "allowed_failures", 0))
    client.register_plugin(DieMidItem(victim.name, marker))
    events: list[ProgressEvent] = []
    try:
        execute_plan(plan, str(tmp_path / "out"), executor=DaskExecutor(client), on_event=events.append)
    finally:
        client.unregister_worker_plugin(DieMidItem.name)
        client.run_on_scheduler(lambda dask_scheduler, n=previous: setattr(dask_scheduler, "allowed_failures", n))
        client.wait_for_workers(2, timeout=60)
    assert os.path.exists(marker)  # a worker really died inside the item
    assert sum(e.kind == EventKind.ITEM_START and e.item == victim.id for e in events) >= 1
    assert_same_output(expected, str(tmp_path / "out"), plan)
    if allowed_failures is not None:
        assert any("running it again" in e.message for e in events if e.kind == EventKind.LOG)


def test_cancel_then_resume(client, universal, tmp_path) -> None:
    plan, expected = universal
    cancel = threading.Event()
    done: list[str] = []

    def on_event(e: ProgressEvent) -> None:
        if e.kind == EventKind.ITEM_DONE:
            done.append(e.item)
            if len(done) == 5:
                cancel.set()

    dst = str(tmp_path / "out")
    with pytest.raises(Cancelled):
        execute_plan(plan, dst, executor=DaskExecutor(client), on_event=on_event, cancel=cancel)
    assert 5 <= len(done) < len(plan.items) and not os.path.exists(dst)
    result = execute_plan(plan, dst, executor=DaskExecutor(client), resume=True)
    assert result.items_skipped == len(done)  # every item finished before the stop was journaled
    assert_same_output(expected, dst, plan)


def test_cluster_gone_keeps_partial_output_for_resume(universal, tmp_path) -> None:
    plan, expected = universal
    dst = str(tmp_path / "out")
    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1, dashboard_address=":0") as cluster, \
            Client(cluster, set_as_default=False) as c:
        events: list[ProgressEvent] = []

        def on_event(e: ProgressEvent) -> None:
            events.append(e)
            if e.kind == EventKind.ITEM_DONE and e.items_done == 3:
                cluster.scale(0)  # every worker leaves mid-run (a Slurm job reached its walltime)

        with pytest.raises(Cancelled):
            execute_plan(plan, dst, executor=DaskExecutor(c, worker_timeout=1.0), on_event=on_event)
        # the run notices the lost workers one way or another (no workers left, or tasks dropped with them)
        stopped = [e.message for e in events if e.kind == EventKind.LOG and e.message.startswith("stopped:")]
        assert stopped and "--resume" in stopped[-1]
        assert os.path.isdir(partial_dir(dst)) and not os.path.exists(dst)
        cluster.scale(1)
        result = execute_plan(plan, dst, executor=DaskExecutor(c), resume=True)
    assert 3 <= result.items_skipped < len(plan.items)
    assert_same_output(expected, dst, plan)


def test_path_check_names_worker_and_path(client, universal, tmp_path) -> None:
    plan, _ = universal
    worker = sorted(client.nthreads())[1]
    dst = str(tmp_path / "out")
    root = partial_dir(dst)
    source = sample_sources(plan.items)[-1]
    try:
        client.run(_hide, root, workers=[worker])
        with pytest.raises(CheckpointError) as err:
            execute_plan(plan, dst, executor=DaskExecutor(client))
        message = str(err.value)
        assert "\n" not in message and message.startswith(root + ":")
        assert f"Dask worker {worker} cannot see the output root" in message
        client.run(_unhide, workers=[worker])
        client.run(_hide, source, workers=[worker])
        with pytest.raises(CheckpointError) as err:
            execute_plan(plan, dst, executor=DaskExecutor(client))
        assert str(err.value).startswith(f"{source}: Dask worker {worker} cannot read it")
    finally:
        client.run(_unhide, workers=[worker])
    assert not os.path.exists(dst) and not os.path.exists(root)
    shutil.rmtree(root, ignore_errors=True)


def test_item_error_is_the_same_one_line_error(client, tmp_path) -> None:
    src = str(tmp_path / "ckpt")
    shutil.copytree(CASE, src)
    ckpt = engine.read_checkpoint(engine.pick_iteration(engine.discover(src)[0]))
    plan = plan_conversion(ckpt, Target("universal"))
    bad = [f.path for f in ckpt.files if f.role == "optim_states"][0]
    os.truncate(bad, os.path.getsize(bad) // 2)  # still readable by the path check, broken for the items
    messages = []
    for executor in (LocalPoolExecutor(1), DaskExecutor(client)):
        dst = str(tmp_path / f"out{len(messages)}")
        with pytest.raises(CheckpointError) as err:
            execute_plan(plan, dst, executor=executor)
        messages.append(str(err.value))
        assert not os.path.exists(dst) and not os.path.exists(partial_dir(dst))
    assert messages[0] == messages[1] and messages[1].startswith(f"{bad}: ")


def test_sample_sources_covers_every_rank_file(universal) -> None:
    plan, _ = universal
    ckpt = _checkpoint()
    used = {f.tensor.file for i in plan.items if i.param is not None for f in i.param.fragments}
    used |= {i.args["src"] for i in plan.items if i.kind == "copy"}
    assert set(sample_sources(plan.items)) == used
    assert used <= {f.path for f in ckpt.files}
    small = sample_sources(plan.items, limit=3)
    everything = sample_sources(plan.items)
    assert len(small) == 3 and small[0] == everything[0] and small[-1] == everything[-1]


def test_make_executor(monkeypatch) -> None:
    local = make_executor(None, 3)
    assert isinstance(local, LocalPoolExecutor) and local.workers == 3
    monkeypatch.setitem(sys.modules, "distributed", None)  # as if the extra were not installed
    with pytest.raises(PlanError, match=r"install ckpt-explorer\[dask\]"):
        make_executor("tcp://127.0.0.1:8786", None)


def test_unreachable_scheduler_is_one_line() -> None:
    with pytest.raises(CheckpointError) as err:
        DaskExecutor("tcp://127.0.0.1:9", connect_timeout=1.0)
    assert str(err.value).startswith("tcp://127.0.0.1:9: cannot connect to the Dask scheduler")
