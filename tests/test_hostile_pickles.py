"""Hostile pickles: the restricted unpickler never runs code from a checkpoint.

Synthetic by necessity: no real library writes malicious checkpoints. Every payload's effect, if it ran, would
create a marker file; each test asserts the marker never appears and that the load either succeeds with the
global reported as unknown (kept as an inert stand-in, never called) or fails with a one-line CheckpointError
naming the file.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest

from engine import safe_unpickle as su
from engine import standins as S
from engine.errors import CheckpointError
from engine.safe_unpickle import load_plain_pickle, load_torch_metadata, unpickle_bytes
from engine.tensorref import TensorRef

FIXTURES = Path(__file__).parent / "fixtures"
GOOD_OPTIM = FIXTURES / "deepspeed-0.19.8/z1_bf16_ws2/ckpt/global_step3/bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"


# -- hand assembly of pickle opcodes ---------------------------------------------------------------------------
def G(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def U(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def I(value: int) -> bytes:  # noqa: E743
    return b"J" + struct.pack("<i", value)


def T(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def L(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"l"


def D(*pairs: tuple[bytes, bytes]) -> bytes:
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def call(fn: bytes, *args: bytes) -> bytes:
    return fn + T(*args) + b"R"


def P2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def P4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def storage_pid(key: str = "0", storage: str = "FloatStorage", numel: int = 4) -> bytes:
    return T(U("storage"), G("torch", storage), U(key), U("cpu"), I(numel)) + b"Q"


def fake_tensor(size: bytes, stride: bytes, offset: bytes = I(0), pid: bytes | None = None) -> bytes:
    return call(G("torch._utils", "_rebuild_tensor_v2"), pid if pid is not None else storage_pid(), offset, size,
                stride, b"\x89", call(G("collections", "OrderedDict")))


def write_torch_zip(path: Path, pkl: bytes, storages: dict[str, bytes] | None = None) -> Path:
    """A zip laid out like torch.save's (stored members under archive/)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for key, raw in (storages if storages is not None else {"0": bytes(16)}).items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")
    return path


# -- payloads --------------------------------------------------------------------------------------------------
def payloads(marker: Path) -> dict[str, tuple[bytes, str | None]]:
    """name -> (pickle bytes, the global that must be reported when the load succeeds; None if it must fail)."""
    cmd = f"touch {marker}"
    py = f"__import__('os').system('touch {marker}')"
    imp = call(G("builtins", "__import__"), U("os"))
    return {
        "os.system": (P2(call(G("os", "system"), U(cmd))), "os.system"),
        "posix.system": (P2(call(G("posix", "system"), U(cmd))), "posix.system"),
        "nt.system": (P2(call(G("nt", "system"), U(cmd))), "nt.system"),
        "builtins.eval": (P2(call(G("builtins", "eval"), U(py))), "builtins.eval"),
        "__builtin__.exec": (P2(call(G("__builtin__", "exec"), U(py))), "builtins.exec"),
        "builtins.__import__": (P2(imp), "builtins.__import__"),
        # getattr(__import__('os'), 'system')('touch ...'): a REDUCE whose result is called by a second REDUCE
        "reduce chain": (P2(call(G("builtins", "getattr"), imp, U("system")) + T(U(cmd)) + b"R"), None),
        "subprocess.Popen": (P2(call(G("subprocess", "Popen"), L(U("touch"), U(str(marker))))), "subprocess.Popen"),
        "subprocess.check_output": (
            P2(call(G("subprocess", "check_output"), L(U("touch"), U(str(marker))))), "subprocess.check_output"),
        "nested containers": (
            P2(D((U("a"), L(T(D((U("b"), call(G("os", "system"), U(cmd))))))))), "os.system"),
        "inside tensor hooks": (
            P2(call(G("torch._utils", "_rebuild_tensor_v2"), storage_pid(), I(0), T(I(4)), T(I(1)), b"\x89",
                    call(G("os", "system"), U(cmd)))), "os.system"),
        "inside tensor size": (P2(fake_tensor(T(call(G("os", "system"), U(cmd))), T(I(1)))), None),
        "tensor rebuilt from a non-storage": (
            P2(fake_tensor(T(I(4)), T(I(1)), pid=call(G("os", "system"), U(cmd)))), None),
        "tensor rebuilt from a string": (P2(fake_tensor(T(I(4)), T(I(1)), pid=U("storage"))), None),
        "rebuild_from_type with a foreign func": (
            P2(call(G("torch._tensor", "_rebuild_from_type_v2"), G("os", "system"), G("torch", "Tensor"),
                    T(U(cmd)), D())), "os.system"),
        "INST opcode": (P2(b"(" + U(cmd) + b"ios\nsystem\n"), "os.system"),
        "OBJ opcode": (P2(b"(" + G("os", "system") + U(cmd) + b"o"), "os.system"),
        "NEWOBJ on a foreign class": (P2(G("subprocess", "Popen") + T(L(U("touch"), U(str(marker)))) + b"\x81"),
                                      "subprocess.Popen"),
        "NEWOBJ_EX with kwargs": (
            P4(G("subprocess", "Popen") + T(L(U("touch"), U(str(marker)))) + D((U("shell"), b"\x89")) + b"\x92"),
            "subprocess.Popen"),
        "STACK_GLOBAL": (P4(U("os") + U("system") + b"\x93" + T(U(cmd)) + b"R"), "os.system"),
        "STACK_GLOBAL on non-strings": (P4(I(1) + I(2) + b"\x93"), None),
        "copyreg._reconstructor with a hostile class": (
            P2(call(G("copyreg", "_reconstructor"), G("subprocess", "Popen"), G("subprocess", "Popen"),
                    L(U("touch"), U(str(marker))))), "subprocess.Popen"),
        "copy_reg._reconstructor with a non-class": (
            P2(call(G("copy_reg", "_reconstructor"), G("torch", "Size"), G("builtins", "object"), U(cmd))), None),
        "copyreg.__newobj__": (P2(call(G("copyreg", "__newobj__"), G("os", "system"), U(cmd))), "copyreg.__newobj__"),
        "pathlib with an object argument": (P2(call(G("pathlib", "PosixPath"), call(G("os", "system"), U(cmd)))),
                                            None),
        "torch.device with an object argument": (P2(call(G("torch", "device"), call(G("os", "system"), U(cmd)))),
                                                 None),
        "codecs.encode with a foreign codec": (P2(call(G("_codecs", "encode"), U(cmd), U("rot13"))), None),
        "bytearray memory bomb": (P2(call(G("builtins", "bytearray"), b"\x8a\x05\x00\x00\x00\x00\x10")), None),
        "torch attribute as a dtype": (P2(call(G("torch", "load"), U(str(marker)))), "torch.load"),
        "torch.serialization.load": (P2(call(G("torch.serialization", "load"), U(str(marker)))),
                                     "torch.serialization.load"),
        "importing a module": (P2(call(G("evil_ckpt_module", "boom"), U(cmd))), "evil_ckpt_module.boom"),
    }


def _check_outcome(path: Path, load, expect: str | None, marker: Path) -> None:
    try:
        loaded = load(str(path))
    except CheckpointError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(str(path) + ": "), msg
        assert len(msg) < 400
    else:
        assert expect is not None, f"{path.name}: hostile pickle loaded without complaint"
        assert expect in loaded.report.unknown_globals
        _assert_inert(loaded.obj)
    assert not marker.exists(), "payload ran"


def _assert_inert(obj, depth: int = 0) -> None:
    """Every object in the result is data, a TensorRef or a stand-in instance (nothing callable but stand-in
    classes, whose instances record arguments only)."""
    assert depth < 50
    if isinstance(obj, dict):
        for k, v in obj.items():
            _assert_inert(k, depth + 1)
            _assert_inert(v, depth + 1)
    elif isinstance(obj, (list, tuple, set, frozenset)):
        for v in obj:
            _assert_inert(v, depth + 1)
    elif isinstance(obj, S.StandIn):
        assert not callable(obj)
        for v in obj.__dict__.values():
            _assert_inert(v, depth + 1)
    elif isinstance(obj, type):
        assert issubclass(obj, S.StandIn) or obj in (OrderedDict, set, frozenset, slice, complex)
    else:
        assert isinstance(obj, (str, bytes, bytearray, int, float, complex, type(None), TensorRef, slice, su._Guarded))


@pytest.fixture()
def marker(tmp_path: Path) -> Path:
    evil = tmp_path / "mods"
    evil.mkdir()
    m = tmp_path / "MARKER"
    (evil / "evil_ckpt_module.py").write_text(f"open({str(m)!r}, 'w').close()\nboom = print\n")
    sys.path.insert(0, str(evil))
    yield m
    sys.path.remove(str(evil))
    sys.modules.pop("evil_ckpt_module", None)
    assert not m.exists()


@pytest.mark.parametrize("name", sorted(payloads(Path("/x"))))
def test_hostile_torch_zip(tmp_path: Path, marker: Path, name: str) -> None:
    pkl, expect = payloads(marker)[name]
    path = write_torch_zip(tmp_path / "hostile.pt", pkl)
    _check_outcome(path, load_torch_metadata, expect, marker)
    assert "evil_ckpt_module" not in sys.modules


@pytest.mark.parametrize("name", sorted(payloads(Path("/x"))))
def test_hostile_plain_pickle(tmp_path: Path, marker: Path, name: str) -> None:
    pkl, expect = payloads(marker)[name]
    if name.startswith(("tensor", "inside tensor")):
        expect = None  # no zip: persistent ids are refused or the rebuild fails
    path = tmp_path / ".metadata"
    path.write_bytes(pkl)
    _check_outcome(path, load_plain_pickle, expect, marker)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvilEval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"__import__('os').system('touch {self.marker}')",))


class _EvilPopen:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.Popen, (["touch", str(self.marker)],))


@pytest.mark.parametrize("cls, qual", [(_Evil, os.system.__module__ + ".system"), (_EvilEval, "builtins.eval"),
                                       (_EvilPopen, "subprocess.Popen")])
def test_torch_save_of_reduce_payload(tmp_path: Path, marker: Path, cls, qual: str) -> None:
    """The payload written by torch.save itself, next to real tensors, as an attacker would ship it."""
    import torch

    path = tmp_path / "model.pt"
    torch.save({"weight": torch.arange(6.0).view(2, 3), "extra": {"hook": [cls(marker)]}}, path)
    loaded = load_torch_metadata(str(path))
    assert qual in loaded.report.unknown_globals
    assert isinstance(loaded.obj["weight"], TensorRef) and loaded.obj["weight"].shape == (2, 3)
    hook = loaded.obj["extra"]["hook"][0]
    assert isinstance(hook, S.UnknownGlobal) and not callable(hook)
    assert not marker.exists()


def test_storage_outside_its_record(tmp_path: Path) -> None:
    cases = {
        "offset past storage": fake_tensor(T(I(4)), T(I(1)), offset=I(2)),
        "size past storage": fake_tensor(T(I(5)), T(I(1))),
        "stride past storage": fake_tensor(T(I(2), I(2)), T(I(3), I(1))),
        "negative size": fake_tensor(T(I(-1)), T(I(1))),
        "negative offset": fake_tensor(T(I(2)), T(I(1)), offset=I(-1)),
        "rank mismatch": fake_tensor(T(I(1000000)), T()),
        "storage larger than record": fake_tensor(T(I(8)), T(I(1)), pid=storage_pid(numel=8)),
        "record missing": fake_tensor(T(I(4)), T(I(1)), pid=storage_pid(key="7")),
        "storage type not a storage": fake_tensor(T(I(4)), T(I(1)), pid=T(U("storage"), G("torch", "load"), U("0"),
                                                                           U("cpu"), I(4)) + b"Q"),
        "stride 0 memory bomb": fake_tensor(T(b"\x8a\x05\x00\x00\x00\x00\x10"), T(I(0))),
        "bool as size": fake_tensor(T(b"\x88"), T(I(1))),
        "v3 with a foreign dtype": call(G("torch._utils", "_rebuild_tensor_v3"), storage_pid(), I(0), T(I(4)), T(I(1)),
                                        b"\x89", call(G("collections", "OrderedDict")), G("torch", "load")),
        "v3 with a string dtype": call(G("torch._utils", "_rebuild_tensor_v3"), storage_pid(), I(0), T(I(4)), T(I(1)),
                                       b"\x89", call(G("collections", "OrderedDict")), U("float32")),
    }
    for name, body in cases.items():
        path = write_torch_zip(tmp_path / f"{name.replace(' ', '_')}.pt", P2(body))
        with pytest.raises(CheckpointError) as info:
            load_torch_metadata(str(path))
        assert str(info.value).startswith(str(path) + ": "), name
        assert "\n" not in str(info.value)


def test_record_claiming_bytes_past_the_end_of_the_file(tmp_path: Path) -> None:
    """A storage record whose central-directory size runs past the end of the file is refused before any read."""
    path = write_torch_zip(tmp_path / "t.pt", P2(fake_tensor(T(I(4)), T(I(1)))))
    assert isinstance(load_torch_metadata(str(path)).obj, TensorRef)
    raw = bytearray(path.read_bytes())
    at = raw.find(b"PK\x01\x02")
    patched = 0
    while at >= 0:
        nlen = struct.unpack_from("<H", raw, at + 28)[0]
        if raw[at + 46: at + 46 + nlen] == b"archive/data/0":
            struct.pack_into("<II", raw, at + 20, 1 << 30, 1 << 30)
            patched += 1
        at = raw.find(b"PK\x01\x02", at + 4)
    assert patched == 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="outside the file|past the end"):
        load_torch_metadata(str(path))


@pytest.mark.parametrize("pid", [
    U("storage"),
    T(U("module"), U("os"), U("system"), U("x"), I(1)),
    T(U("storage"), G("torch", "FloatStorage"), U("0"), U("cpu")),
    T(U("storage"), G("torch", "FloatStorage"), call(G("os", "system"), U("true")), U("cpu"), I(4)),
    T(U("storage"), G("torch", "FloatStorage"), U("0"), U("cpu"), U("4")),
    T(U("storage"), U("evil"), U("0"), U("cpu"), I(4)),
])
def test_persistent_id_that_is_not_a_storage(tmp_path: Path, pid: bytes) -> None:
    path = write_torch_zip(tmp_path / "pid.pt", P2(pid + b"Q"))
    with pytest.raises(CheckpointError) as info:
        load_torch_metadata(str(path))
    assert str(info.value).startswith(str(path))


def _fragment(state: bytes) -> bytes:
    return G("deepspeed.utils.tensor_fragment", "fragment_address") + T() + b"\x81" + state + b"b"


def test_build_cannot_set_dunders_on_standins(tmp_path: Path, marker: Path) -> None:
    system = G("os", "system")
    state = D((U("numel"), I(4)), (U("start"), I(0)), (U("__class__"), system), (U("__dict__"), D()),
              (U("__reduce__"), system), (U("__setstate__"), system), (U("fields"), system),
              (U("qualname"), U("spoofed")), (U("__si_args__"), T(U("spoofed"))))
    slot_state = T(b"N", D((U("__class__"), G("collections", "OrderedDict")), (U("__repr__"), system)))
    for body in (_fragment(state), _fragment(slot_state)):
        path = write_torch_zip(tmp_path / "build.pt", P2(L(body)))
        loaded = load_torch_metadata(str(path))
        frag = loaded.obj[0]
        assert type(frag) is S.FragmentAddress
        assert frag.args == ()
        assert callable(frag.fields) and "__class__" not in frag.__dict__ and "__reduce__" not in frag.__dict__
        assert type(frag).qualname == "deepspeed.utils.tensor_fragment.fragment_address"
        repr(frag)
    assert loaded.obj[0].state is not None
    assert not marker.exists()


def test_build_cannot_modify_classes_or_guarded_callables(tmp_path: Path) -> None:
    """BUILD on a class object or on one of our callables must fail, so no pickle can poison later loads."""
    targets = [G("deepspeed.utils.tensor_fragment", "fragment_address"), G("evil", "Thing"), G("torch", "Size"),
               G("collections", "OrderedDict"), G("torch._utils", "_rebuild_tensor_v2"), G("_codecs", "encode"),
               G("copyreg", "_reconstructor"), G("builtins", "set")]
    for i, target in enumerate(targets):
        for state in (D((U("__init__"), G("os", "system"))), T(b"N", D((U("__call__"), G("os", "system")))),
                      T(b"N", D((U("numel"), I(99))))):
            path = write_torch_zip(tmp_path / f"cls{i}.pt", P2(target + state + b"b"))
            with pytest.raises(CheckpointError):
                load_torch_metadata(str(path))
    assert not hasattr(S.FragmentAddress, "numel")
    assert S.FragmentAddress.__init__ is S.StandIn.__init__
    good = load_torch_metadata(str(GOOD_OPTIM))
    frags = good.obj["optimizer_state_dict"]["param_slice_mappings"][0]
    assert all(type(f) is S.FragmentAddress and isinstance(f.numel, int) for f in frags.values())


def test_build_cannot_rewrite_storages_or_tensor_refs(tmp_path: Path) -> None:
    """StorageStub and TensorRef are frozen dataclasses, but BUILD writes through their __dict__: a pickle could
    enlarge a tensor after its bounds were checked (a memory bomb, or reads past its storage)."""
    grow = D((U("shape"), T(b"\x8a\x05\x00\x00\x00\x00\x10")), (U("stride"), T(I(0))))
    cases = {
        "tensor after rebuild": fake_tensor(T(I(4)), T(I(1))) + grow + b"b",
        "tensor, extra field": fake_tensor(T(I(4)), T(I(1))) + D((U("evil"), I(1))) + b"b",
        "storage before rebuild": call(G("torch._utils", "_rebuild_tensor_v2"),
                                       storage_pid() + D((U("numel"), I(1 << 30))) + b"b", I(0), T(I(4)), T(I(1)),
                                       b"\x89", call(G("collections", "OrderedDict"))),
    }
    for body in cases.values():
        path = write_torch_zip(tmp_path / "rw.pt", P2(L(body)))
        with pytest.raises(CheckpointError, match="modifies the tensor|pristine"):
            load_torch_metadata(str(path))
    ok = write_torch_zip(tmp_path / "ok.pt", P2(L(fake_tensor(T(I(4)), T(I(1))))))
    assert load_torch_metadata(str(ok)).obj[0].shape == (4,)


def test_build_on_ordered_dict_instance_cannot_change_its_class(tmp_path: Path) -> None:
    od = call(G("collections", "OrderedDict"))
    body = od + T(b"N", D((U("__class__"), G("deepspeed.utils.tensor_fragment", "fragment_address")))) + b"b"
    path = write_torch_zip(tmp_path / "od.pt", P2(body))
    with pytest.raises(CheckpointError):
        load_torch_metadata(str(path))


@pytest.mark.parametrize("target", [call(G("collections", "OrderedDict")), call(G("torch", "Size"), T(I(2), I(3))),
                                    G("torch", "float32")])
def test_build_cannot_shadow_methods_of_plain_values(tmp_path: Path, target: bytes) -> None:
    """`od.items = <stand-in>` through BUILD would make every reader's `od.items()` fail (or lie)."""
    state = D((U("items"), G("os", "system")), (U("startswith"), I(1)), (U("count"), I(1)))
    path = write_torch_zip(tmp_path / "shadow.pt", P2(D((U("x"), target + state + b"b"))))
    with pytest.raises(CheckpointError, match="sets attribute '(items|startswith|count)' on a"):
        load_torch_metadata(str(path))
    harmless = write_torch_zip(tmp_path / "meta.pt", P2(D((U("x"), target + D((U("_metadata"), D())) + b"b"))))
    assert load_torch_metadata(str(harmless)).obj["x"].__dict__ == {"_metadata": {}}


def test_standin_classes_are_read_only() -> None:
    with pytest.raises(AttributeError):
        S.FragmentAddress.__setstate__ = print  # type: ignore[method-assign]
    inst = S.FragmentAddress()
    with pytest.raises(AttributeError):
        inst.numel = 3


def test_find_class_never_returns_a_harmful_callable() -> None:
    report = su.PickleReport()
    unp = su.RestrictedUnpickler(b".", "x", None, report)
    dangerous = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
                 ("builtins", "getattr"), ("builtins", "__import__"), ("builtins", "open"), ("builtins", "type"),
                 ("builtins", "object"), ("subprocess", "Popen"), ("subprocess", "check_output"),
                 ("torch", "load"), ("torch.serialization", "load"), ("torch", "_C"), ("numpy", "load"),
                 ("pickle", "loads"), ("io", "open"), ("shutil", "rmtree"), ("functools", "partial"),
                 ("operator", "attrgetter"), ("copyreg", "__newobj__"), ("sys", "modules"), ("torch", "Storage"),
                 ("torch._utils", "_rebuild_qtensor"), ("runpy", "run_path"), ("code", "interact")]
    for module, name in dangerous:
        got = unp.find_class(module, name)
        assert isinstance(got, type) and issubclass(got, S.UnknownGlobal), (module, name, got)
        assert got.qualname == f"{module}.{name}"
        inst = got("touch /tmp/never")
        assert not callable(inst)
    assert {f"{m}.{n}" for m, n in dangerous} <= report.unknown_globals
    allowed = [("collections", "OrderedDict"), ("torch", "Size"), ("torch", "FloatStorage"), ("torch", "bfloat16"),
               ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_tensor_v3"),
               ("torch._utils", "_rebuild_parameter"), ("torch._tensor", "_rebuild_from_type_v2"),
               ("_codecs", "encode"), ("copyreg", "_reconstructor"), ("argparse", "Namespace"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy", "dtype"), ("pathlib", "PosixPath"),
               ("torch", "device"), ("builtins", "set"), ("builtins", "bytearray"), ("torch.serialization",
                                                                                     "_get_layout"),
               ("deepspeed.utils.tensor_fragment", "fragment_address"), ("megatron.core.enums", "ModelType"),
               ("torch.distributed.checkpoint.metadata", "Metadata")]
    for module, name in allowed:
        got = unp.find_class(module, name)
        safe_type = isinstance(got, type) and (issubclass(got, S.StandIn) or got in (OrderedDict, set))
        assert safe_type or isinstance(got, (su._Guarded, str)), (module, name, got)
        if isinstance(got, su._Guarded):
            with pytest.raises(AttributeError):
                got.fn = print


def test_reconstructor_only_builds_standins() -> None:
    hostile = S.standin_class(S.UnknownGlobal, "subprocess.Popen")
    made = su._reconstructor(hostile, object, ["touch", "/tmp/never"])
    assert isinstance(made, S.UnknownGlobal) and made.args == (["touch", "/tmp/never"],)
    assert su._reconstructor(OrderedDict, dict, None) == OrderedDict()
    for cls in (os.system, subprocess.Popen, dict, type, su._GUARDED["torch.Size"]):
        with pytest.raises(pickle.UnpicklingError):
            su._reconstructor(cls, object, None)


# -- resource exhaustion ----------------------------------------------------------------------------------------
def _memo_chain(depth: int) -> bytes:
    """[[[...]]] nested `depth` deep through the memo, with a stack that never holds more than two items."""
    out = [b"\x80\x02]r", struct.pack("<I", 0)]
    for i in range(1, depth):
        out += [b"0]r", struct.pack("<I", i), b"j", struct.pack("<I", i - 1), b"a"]
    return b"".join(out) + b"."


def _laughs(levels: int) -> bytes:
    """Each level is a list holding the previous level twice: 2**levels leaves from a linear-size pickle."""
    out = [b"\x80\x02", U("lol"), b"r", struct.pack("<I", 0)]
    for i in range(1, levels + 1):
        out += [b"0(j", struct.pack("<I", i - 1), b"j", struct.pack("<I", i - 1), b"lr", struct.pack("<I", i)]
    return b"".join(out) + b"."


@pytest.mark.parametrize("name, data", [
    ("LONG_BINPUT huge index", b"\x80\x02]r\xff\xff\xff\x7f."),
    ("PUT huge index", b"(lp4000000000\n."),
    ("BINBYTES8 huge length", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 40) + b"."),
    ("BINUNICODE past the end", b"\x80\x02X" + struct.pack("<I", 1 << 31) + b"abc."),
    ("FRAME then garbage", b"\x80\x04\x95" + struct.pack("<Q", 9) + b"\xff."),
    ("out-of-band buffer", b"\x80\x05\x97."),
    ("deep MARK nesting", b"\x80\x02" + b"(" * 200_000 + b"."),
    ("deep list nesting", b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b"."),
    ("deep memo nesting", _memo_chain(3000)),
    ("self-referencing list", b"\x80\x02]q\x00h\x00a."),
    ("self-referencing dict", b"\x80\x02}q\x00U\x01kh\x00s."),
    ("billion laughs", _laughs(40)),
    ("no STOP", b"\x80\x02]"),
    ("empty", b""),
])
def test_resource_bombs_fail_fast(tmp_path: Path, name: str, data: bytes) -> None:
    import time

    t0 = time.perf_counter()
    plain = tmp_path / "bomb.pkl"
    plain.write_bytes(data)
    for loader, path in ((load_torch_metadata, write_torch_zip(tmp_path / "bomb.pt", data)),
                         (load_plain_pickle, plain)):
        with pytest.raises(CheckpointError) as info:
            loader(str(path))
        assert str(info.value).startswith(str(path) + ": ") and "\n" not in str(info.value)
    assert time.perf_counter() - t0 < 5, name


def test_huge_memo_index_allocates_nothing(tmp_path: Path) -> None:
    """Under a 1 GiB address-space limit the C unpickler would die on LONG_BINPUT 0x7fffffff; the pre-scan
    refuses it first."""
    path = tmp_path / "memo.pkl"
    path.write_bytes(b"\x80\x02]r\xff\xff\xff\x7f.")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30));"
            "from engine.safe_unpickle import load_plain_pickle; from engine.errors import CheckpointError\n"
            f"try:\n    load_plain_pickle({str(path)!r})\nexcept CheckpointError as e:\n    print('REFUSED', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).parent.parent)
    assert "REFUSED" in out.stdout and "memo index" in out.stdout, out.stderr[-500:]


def test_legit_shared_objects_still_load() -> None:
    """Sharing (one storage under two tensors, one dict twice) is fine; only cycles and blow-ups are refused."""
    shared = D((U("k"), I(1)))
    body = L(shared + b"q\x05", b"h\x05", fake_tensor(T(I(2)), T(I(1))), fake_tensor(T(I(2)), T(I(1)), I(2)))
    loaded = unpickle_bytes(P2(body), "mem")
    assert loaded.obj[0] is loaded.obj[1]
    assert loaded.obj[2].storage_key == loaded.obj[3].storage_key == "0"


def test_laughs_below_the_limit_load() -> None:
    assert unpickle_bytes(_laughs(12), "x").obj is not None


def test_pickle_bytes_helper_round_trips() -> None:
    """The hand assembler writes pickles Python itself reads the same way (guards the helpers above)."""
    assert pickle.loads(P2(D((U("a"), L(T(I(1), I(-2)), U("x")))))) == {"a": [(1, -2), "x"]}
    expected: object = "lol"
    for _ in range(3):
        expected = [expected, expected]
    assert pickle.loads(_laughs(3)) == expected
    lst = pickle.loads(_memo_chain(5))
    depth = 0
    while isinstance(lst, list) and lst:
        lst, depth = lst[0], depth + 1
    assert depth == 4 and lst == []
    buf = io.BytesIO()
    pickle.dump([1], buf, protocol=2)
    assert unpickle_bytes(buf.getvalue(), "p").obj == [1]


def test_hostile_dcp_metadata(tmp_path: Path, marker: Path) -> None:
    """A real torch.distributed.checkpoint Metadata object, pickled the way DCP writes `.metadata`, carrying a
    payload in planner_data: loads with the payload reported and inert."""
    from torch.distributed.checkpoint.metadata import Metadata

    meta = Metadata(state_dict_metadata={}, planner_data={"x": _Evil(marker)})
    path = tmp_path / ".metadata"
    path.write_bytes(pickle.dumps(meta))
    loaded = load_plain_pickle(str(path))
    assert f"{os.system.__module__}.system" in loaded.report.unknown_globals
    assert type(loaded.obj).qualname == "torch.distributed.checkpoint.metadata.Metadata"
    _assert_inert(loaded.obj)
    assert not marker.exists()


def test_real_dcp_metadata_with_payload_appended(tmp_path: Path, marker: Path) -> None:
    """The real fixture's `.metadata` with its STOP replaced by a payload call: still never runs."""
    real = (FIXTURES / "megatron-core-0.16.1/gpt_tp2/ckpt/iter_0000001/.metadata").read_bytes()
    assert real.endswith(b".")
    path = tmp_path / ".metadata"
    path.write_bytes(real[:-1] + b"0" + call(G("os", "system"), U(f"touch {marker}")) + b".")
    loaded = load_plain_pickle(str(path))
    assert "os.system" in loaded.report.unknown_globals
    assert not marker.exists()


LIVE = ("os.system", "posix.system", "builtins.eval", "__builtin__.exec", "reduce chain", "subprocess.Popen",
        "subprocess.check_output", "nested containers", "INST opcode", "OBJ opcode", "STACK_GLOBAL",
        "importing a module", "inside tensor hooks", "copyreg._reconstructor with a hostile class")


def test_payloads_are_live_under_plain_pickle(tmp_path: Path) -> None:
    """Guards the tests above: the same bytes fed to the stock unpickler really create their markers (in one child
    process, with torch's persistent ids answered by a dummy)."""
    mods = tmp_path / "mods"
    mods.mkdir()
    import_marker = tmp_path / "M_import"
    (mods / "evil_ckpt_module.py").write_text(f"open({str(import_marker)!r}, 'w').close()\nboom = print\n")
    files = []
    for i, name in enumerate(LIVE):
        marker = import_marker if name == "importing a module" else tmp_path / f"M_{i}"
        src = tmp_path / f"p{i}.pkl"
        src.write_bytes(payloads(marker)[name][0])
        files.append((name, src, marker))
    code = ("import pickle, sys, time\n"
            f"sys.path.insert(0, {str(mods)!r})\n"
            "class U(pickle.Unpickler):\n    def persistent_load(self, pid):\n        return pid\n"
            f"for f in {[str(src) for _, src, _ in files]!r}:\n"
            "    try:\n        U(open(f, 'rb')).load()\n    except Exception:\n        pass\n"
            "time.sleep(0.5)\n")
    subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True)
    for name, _, marker in files:
        assert marker.exists(), f"payload {name!r} is not live: the test proves nothing"


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_scanner_accepts_everything_pickle_writes(protocol: int) -> None:
    """The opcode pre-scan must not refuse valid pickles of any protocol (text opcodes, frames, memo forms)."""
    obj = {"s": "text\nwith newline", "u": "\u00e9\u4e2d", "b": b"\x00\xff" * 300, "ints": [0, -1, 255, 65536, -2**31,
           2**40, 2**100, -2**300], "f": [1.5, -0.0, 1e300], "t": (1, (2, (3,))), "n": [None, True, False],
           "set": {1, 2}, "fs": frozenset({"a"}), "ba": bytearray(b"xyz"), "od": OrderedDict([("k", [1, 2])]),
           "c": 1 + 2j, "slice": slice(1, 9, 2), "long": "x" * 70000, "many": [[i] for i in range(400)]}
    obj["shared"] = [obj["t"], obj["t"]]
    data = pickle.dumps(obj, protocol=protocol)
    assert unpickle_bytes(data, "p").obj == obj
