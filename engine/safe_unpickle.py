"""Restricted unpickling of torch checkpoints: an allowlist, inert stand-ins, and tensors as metadata only.

Safety model: `find_class` never imports anything and never returns a real library callable. It returns
only (a) immutable builtin types that cannot do harm (OrderedDict, set, frozenset, slice, complex),
(b) `_Guarded` wrappers around this module's own argument-checking functions (objects that reject attribute
writes, so BUILD cannot alter them), (c) stand-in classes (read-only classes, see standins.py) or (d) plain
values (dtype names). A pre-scan of the opcode stream bounds memo indices and lengths before the C unpickler
allocates anything, and a post-scan bounds the depth and expanded size of the object graph and refuses
cycles, so callers can walk the result naively.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from math import prod
from typing import Any

from . import standins as S
from .errors import CheckpointError, UnsafePickleError
from .tensorref import ITEMSIZE, STORAGE_DTYPES, DType, Size, StorageStub, TensorRef
from .torchzip import TorchZip

_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
                  "short": "int16"}
_TORCH_DTYPES = frozenset(ITEMSIZE) | frozenset(_DTYPE_ALIASES)

# Named stand-ins for classes that real DeepSpeed / Megatron / numpy / DCP pickles reference.
_KNOWN_STANDINS: dict[str, type[S.StandIn]] = {
    "deepspeed.utils.tensor_fragment.fragment_address": S.FragmentAddress,
    "deepspeed.runtime.zero.config.ZeroStageEnum": S.ZeroStage,
    "deepspeed.runtime.fp16.loss_scaler.LossScaler": S.LossScaler,
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler": S.DynamicLossScaler,
    "deepspeed.checkpoint.universal_checkpoint.SubparamShape": S.SubparamShape,
    "numpy.ndarray": S.NumpyArray,
    "numpy.dtype": S.NumpyDType,
}
_KNOWN_PREFIXES_ENUM = ("megatron.core.enums.", "megatron.core.transformer.enums.", "megatron.model.enums.",
                        "torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING",
                        "torch.distributed.checkpoint.planner.WriteItemType",
                        "megatron.core.rerun_state_machine.")
_KNOWN_DATA_PREFIXES = ("torch.distributed.checkpoint.", "megatron.core.dist_checkpointing.",
                        "numpy.dtypes.", "megatron.core.optimizer.optimizer_config.")

# Bounds on what a pickle may ask for; real checkpoints stay far below them.
MAX_DEPTH = 100  # container nesting of the result (state dicts nest < 15 deep)
MAX_EXPANDED = 5_000_000  # nodes of the result seen as a tree (shared sub-objects counted per use)
# A view may cover more elements than its storage holds (stride 0) but not absurdly more: reading it would
# allocate numel * itemsize bytes.
MAX_VIEW_BLOWUP = 1 << 30
_INTS = frozenset({int})


@dataclass
class PickleReport:
    """What one unpickling saw: tensors it described and globals it refused to resolve."""

    tensors: list[TensorRef] = field(default_factory=list)
    unknown_globals: set[str] = field(default_factory=set)


class _Guarded:
    """A callable handed to the unpickler: wraps one of our own functions and cannot be modified by a pickle."""

    __slots__ = ("fn", "qualname")

    def __init__(self, fn: Callable[..., Any], qualname: str) -> None:
        object.__setattr__(self, "fn", fn)
        object.__setattr__(self, "qualname", qualname)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{self.qualname} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{self.qualname} is read-only")

    def __repr__(self) -> str:
        return f"<{self.qualname}>"


def _plain(value: Any, what: str) -> str | int:
    if type(value) not in (str, int):
        raise TypeError(f"{what} expects a string or int argument")
    return value


def _device(*args: Any) -> str:
    return "device(" + ", ".join(str(_plain(a, "torch.device")) for a in args) + ")"


def _path(*parts: Any) -> str:
    return "/".join(str(_plain(p, "pathlib.Path")) for p in parts)


def _layout(name: Any) -> str:
    if type(name) is not str:
        raise TypeError("torch.serialization._get_layout expects a string")
    return name


def _size(*args: Any) -> Size:
    if not args:
        return Size()
    if len(args) != 1 or not isinstance(args[0], (tuple, list)) or any(type(x) is not int for x in args[0]):
        raise TypeError("torch.Size expects one tuple of ints")
    return Size(args[0])


def _safe_encode(obj: Any, encoding: str = "latin1") -> bytes:
    if type(obj) is not str or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return obj.encode(encoding)


def _bytearray(*args: Any) -> bytearray:
    if len(args) == 0:
        return bytearray()
    if len(args) == 1 and isinstance(args[0], (bytes, list)):
        return bytearray(args[0])
    if len(args) == 2 and type(args[0]) is str and type(args[1]) is str:
        return bytearray(_safe_encode(args[0], args[1]))
    raise TypeError("bytearray() from a pickle takes bytes, a list of ints or (str, encoding)")


def _numpy_scalar(*args: Any) -> Any:
    return S.standin_class(S.Opaque, "numpy.scalar")(*args)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    """copyreg._reconstructor: only builds stand-ins or an empty OrderedDict, never calls a foreign class."""
    if isinstance(cls, type) and issubclass(cls, S.StandIn):
        return cls(state)
    if cls is OrderedDict:
        return OrderedDict()
    raise pickle.UnpicklingError("copyreg._reconstructor on a non-allowlisted class")


_BUILTIN_TYPES: dict[str, Any] = {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex}
_GUARDED: dict[str, _Guarded] = {
    "builtins.bytearray": _Guarded(_bytearray, "builtins.bytearray"),
    "_codecs.encode": _Guarded(_safe_encode, "_codecs.encode"),
    "torch.Size": _Guarded(_size, "torch.Size"),
    "torch.device": _Guarded(_device, "torch.device"),
    "torch.serialization._get_layout": _Guarded(_layout, "torch.serialization._get_layout"),
    "torch._utils._rebuild_parameter": _Guarded(_rebuild_parameter, "torch._utils._rebuild_parameter"),
    "torch._utils._rebuild_parameter_with_state": _Guarded(_rebuild_parameter, "torch._utils._rebuild_parameter"),
    "copyreg._reconstructor": _Guarded(_reconstructor, "copyreg._reconstructor"),
    "numpy.core.multiarray.scalar": _Guarded(_numpy_scalar, "numpy.scalar"),
    "numpy._core.multiarray.scalar": _Guarded(_numpy_scalar, "numpy.scalar"),
}
for _p in ("PosixPath", "PurePosixPath", "Path", "WindowsPath", "PureWindowsPath"):
    _GUARDED[f"pathlib.{_p}"] = _Guarded(_path, f"pathlib.{_p}")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allowlisted globals; everything else becomes an inert, reported stand-in."""

    def __init__(self, data: bytes, path: str, zip_dir: TorchZip | None, report: PickleReport,
                 base_offset: int = 0, *, storages: bool = True) -> None:
        super().__init__(io.BytesIO(data))
        self.storages = storages
        self.path = path
        self.zip_dir = zip_dir
        self.report = report
        self.base_offset = base_offset
        self._rebuild_v2 = _Guarded(self._rebuild_tensor, "torch._utils._rebuild_tensor_v2")
        self._rebuild_v3 = _Guarded(self._rebuild_tensor_v3, "torch._utils._rebuild_tensor_v3")
        self._from_type = _Guarded(self._rebuild_from_type, "torch._tensor._rebuild_from_type_v2")
        self._stubs: dict[int, dict[str, Any]] = {}
        self._keep: list[StorageStub] = []  # keeps ids in _stubs unique while loading
        self._refs: list[tuple[TensorRef, dict[str, Any]]] = []

    # torch.save writes ('storage', StorageClass, key, location, numel)
    def persistent_load(self, pid: Any) -> Any:
        if not self.storages:
            raise UnsafePickleError(self.path, "plain pickle refers to tensor storages (persistent ids)")
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise UnsafePickleError(self.path, f"unexpected persistent id {_brief(pid)}")
        _, dtype, key, _location, numel = pid
        if type(dtype) is not str or dtype not in ITEMSIZE:
            raise CheckpointError(self.path, f"storage has an unsupported storage type {_brief(dtype)}")
        if type(key) is not str or not key or len(key) > 200:
            raise CheckpointError(self.path, f"storage key {_brief(key)} is not a short string")
        if type(numel) is not int or numel < 0:
            raise CheckpointError(self.path, f"storage {key!r} has an invalid element count {_brief(numel)}")
        return self._stub(key, dtype, numel)

    def _stub(self, key: str, dtype: str, numel: int) -> StorageStub:
        stub = StorageStub(key, dtype, numel)
        self._stubs[id(stub)] = dict(stub.__dict__)  # BUILD could rewrite a frozen dataclass through __dict__
        self._keep.append(stub)
        return stub

    def _pristine(self, storage: Any) -> StorageStub:
        if type(storage) is not StorageStub or storage.__dict__ != self._stubs.get(id(storage)):
            raise CheckpointError(self.path, "tensor rebuild without a (pristine) storage record")
        return storage

    def _rebuild_tensor_v3(self, storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any = None,
                           hooks: Any = None, dtype: Any = None, *rest: Any) -> TensorRef:
        # v3 pickles an untyped storage (numel counted in bytes) and names the dtype explicitly.
        if not isinstance(dtype, DType) or dtype not in ITEMSIZE:
            raise CheckpointError(self.path, f"tensor has an unsupported dtype {_brief(dtype)}")
        storage = self._pristine(storage)
        itemsize = ITEMSIZE[dtype]
        if storage.dtype != "uint8" and storage.dtype != str(dtype):
            raise CheckpointError(self.path, f"storage {storage.key} is {storage.dtype}, its tensor says {dtype}")
        numel = storage.numel // itemsize if storage.dtype == "uint8" else storage.numel
        return self._rebuild_tensor(self._stub(storage.key, str(dtype), numel), storage_offset, size, stride)

    def _rebuild_tensor(self, storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any) -> TensorRef:
        storage = self._pristine(storage)
        key = storage.key
        if (type(storage_offset) is not int or not isinstance(size, (tuple, list))
                or not isinstance(stride, (tuple, list)) or not _INTS.issuperset(map(type, size))
                or not _INTS.issuperset(map(type, stride))):
            raise CheckpointError(self.path, f"tensor in storage {key} has a non-integer offset, size or stride")
        if len(size) != len(stride) or len(size) > 64:
            raise CheckpointError(self.path, f"tensor in storage {key} has {len(size)} sizes but {len(stride)} strides")
        if storage_offset < 0 or (size and (min(size) < 0 or min(stride) < 0)):
            raise CheckpointError(self.path, f"tensor in storage {key} has a negative offset, size or stride")
        numel = prod(size)
        extent = storage_offset + 1 + sum((d - 1) * s for d, s in zip(size, stride)) if numel else storage_offset
        if extent > storage.numel:
            raise CheckpointError(
                self.path, f"tensor in storage {key} reaches element {extent} of a {storage.numel}-element storage"
            )
        if numel > storage.numel + MAX_VIEW_BLOWUP:
            raise CheckpointError(
                self.path, f"tensor in storage {key} views {numel} elements of a {storage.numel}-element storage"
            )
        zip_dir = self.zip_dir
        if zip_dir is not None:
            rec = zip_dir.records.get(f"{zip_dir.prefix}data/{key}")
            if rec is None:
                raise CheckpointError(self.path, f"storage record data/{key} is missing from the zip")
            nbytes = storage.numel * ITEMSIZE[storage.dtype]
            if nbytes > rec.size:
                raise CheckpointError(
                    self.path,
                    f"storage data/{key} declares {nbytes} bytes but the file holds {rec.size} (corrupt or truncated)",
                )
            if rec.header_offset + rec.size > zip_dir.length:
                raise CheckpointError(self.path, f"storage data/{key} points outside the file (truncated?)")
        ref = TensorRef(self.path, key, storage.dtype, tuple(size), tuple(stride), storage_offset, storage.numel,
                        self.base_offset, self.zip_dir.length if self.zip_dir is not None else None)
        self.report.tensors.append(ref)
        self._refs.append((ref, dict(ref.__dict__)))
        return ref

    def check_refs(self) -> None:
        """BUILD on a TensorRef (a frozen dataclass, but its __dict__ is writable) would change it after the
        checks above: refuse any TensorRef that is no longer what _rebuild_tensor made."""
        for ref, fields in self._refs:
            if ref.__dict__ != fields:
                raise CheckpointError(self.path, f"pickle modifies the tensor in storage {fields['storage_key']}")

    def _rebuild_from_type(self, func: Any, new_type: Any, args: Any, state: Any = None) -> Any:
        if (func is self._rebuild_v2 or func is self._rebuild_v3) and type(args) is tuple:
            return func(*args)
        return S.standin_class(S.Opaque, "torch._tensor._rebuild_from_type_v2")(args)

    def find_class(self, module: str, name: str) -> Any:
        # protocol 0-2 pickles name Python 2 modules (torch.save writes protocol 2): map them like pickle does
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qual = f"{module}.{name}"
        guarded = _GUARDED.get(qual)
        if guarded is not None:
            return guarded
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "builtins" and name in _BUILTIN_TYPES:
            return _BUILTIN_TYPES[name]
        if module == "torch":
            if name in STORAGE_DTYPES:
                return STORAGE_DTYPES[name][0]
            if name in _TORCH_DTYPES:
                return DType(_DTYPE_ALIASES.get(name, name))
            if name in ("Tensor", "nn.Parameter"):
                return S.standin_class(S.Opaque, qual)
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
            return "uint8"
        if module == "torch._utils":
            if name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
                return self._rebuild_v2
            if name == "_rebuild_tensor_v3":
                return self._rebuild_v3
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return self._from_type
        if module == "torch.nn.parameter" and name == "Parameter":
            return S.standin_class(S.Opaque, qual)
        if qual in ("argparse.Namespace", "types.SimpleNamespace"):
            return S.standin_class(S.DataRecord, qual)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return S.standin_class(S.NumpyArray, f"{module}._reconstruct")
        if qual in _KNOWN_STANDINS:
            return _KNOWN_STANDINS[qual]
        if qual.startswith(_KNOWN_PREFIXES_ENUM):
            return S.standin_class(S.EnumValue, qual)
        if qual.startswith(_KNOWN_DATA_PREFIXES):
            return S.standin_class(S.DataRecord, qual)
        if len(qual) > 300:
            raise UnsafePickleError(self.path, f"global name {qual[:60]!r}... is implausibly long")
        self.report.unknown_globals.add(qual)
        return S.standin_class(S.UnknownGlobal, qual)


def _brief(value: Any) -> str:
    """A short, safe description of a value from a pickle (never calls its methods)."""
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    if isinstance(value, (tuple, list)):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, (S.StandIn, _Guarded)):
        return f"<{type(value).qualname if isinstance(value, S.StandIn) else value.qualname}>"
    return f"<{type(value).__name__}>"


# -- opcode pre-scan --------------------------------------------------------------------------------
def _opcode_tables() -> tuple[list[int], list[int]]:
    """FIXED[op] = bytes to skip for opcodes with a fixed-size argument (opcode byte included), else 0;
    KIND[op] = 0 unknown, 1 fixed, 2/3/4 length prefix of 1/4/8 bytes (5 = signed 4), 6 one text line,
    7 two text lines, 8 the memo writes checked apart (PUT, LONG_BINPUT), 9 refused (out-of-band buffers)."""
    import pickletools as pt

    prefix = {pt.TAKEN_FROM_ARGUMENT1: 2, pt.TAKEN_FROM_ARGUMENT4U: 3, pt.TAKEN_FROM_ARGUMENT8U: 4,
              pt.TAKEN_FROM_ARGUMENT4: 5, pt.UP_TO_NEWLINE: 6}
    fixed, kind = [0] * 256, [0] * 256
    for op in pt.opcodes:
        code, arg = ord(op.code), op.arg
        if arg is None or arg.n >= 0:
            fixed[code], kind[code] = 1 + (arg.n if arg is not None else 0), 1
        else:
            kind[code] = prefix[arg.n]
    for code in (pickle.GLOBAL, pickle.INST):
        kind[code[0]] = 7
    for code in (pickle.PUT, pickle.LONG_BINPUT):
        fixed[code[0]], kind[code[0]] = 0, 8
    for code in (pickle.NEXT_BUFFER, pickle.READONLY_BUFFER):
        fixed[code[0]], kind[code[0]] = 0, 9
    fixed[pickle.STOP[0]] = 0  # ends the scan
    return fixed, kind


_FIXED, _KIND = _opcode_tables()
_STOP, _LONG_BINPUT = pickle.STOP[0], pickle.LONG_BINPUT[0]
_PREFIX = {2: (1, False), 3: (4, False), 4: (8, False), 5: (4, True)}


def scan_opcodes(data: bytes, path: str) -> None:
    """Check the opcode stream before the C unpickler sees it: every opcode known, every length inside the data,
    every memo index no larger than the data (the C unpickler sizes its memo array by the largest index it is
    given, so one LONG_BINPUT 0x7fffffff would allocate and zero 32 GiB), no out-of-band buffers."""
    n = len(data)
    i = 0
    fixed, kind = _FIXED, _KIND
    frm = int.from_bytes
    while i < n:
        code = data[i]
        step = fixed[code]
        if step:  # the common case: an opcode with a fixed-size argument
            i += step
            continue
        k = kind[code]
        i += 1
        if code == _STOP:
            return
        if k == 8:
            if code == _LONG_BINPUT:
                index, i = frm(data[i : i + 4], "little"), i + 4
            else:
                end = data.find(b"\n", i)
                text = data[i:end] if end >= 0 else b"x"
                if not text.isdigit() or len(text) > 12:
                    raise CheckpointError(path, f"corrupt pickle: bad PUT argument at byte {i}")
                index, i = int(text), end + 1
            if index > n:
                raise CheckpointError(path, f"corrupt pickle: memo index {index} is larger than the pickle ({n} bytes)")
        elif k in _PREFIX:
            width, signed = _PREFIX[k]
            length = frm(data[i : i + width], "little", signed=signed)
            i += width
            if length < 0 or length > n - i:
                raise CheckpointError(path, f"corrupt or truncated pickle: a {length}-byte argument at byte {i}")
            i += length
        elif k == 6 or k == 7:
            for _ in range(k - 5):
                end = data.find(b"\n", i)
                if end < 0:
                    raise CheckpointError(path, "corrupt or truncated pickle: unterminated text argument")
                i = end + 1
        elif k == 9:
            raise CheckpointError(path, "pickle uses out-of-band buffers, which checkpoints never do")
        else:
            raise CheckpointError(path, f"corrupt pickle: unknown opcode 0x{code:02x} at byte {i - 1}")
    raise CheckpointError(path, "pickle data is truncated (no STOP opcode)")


# -- object graph post-scan -------------------------------------------------------------------------
_LEAF_TYPES = frozenset({str, bytes, int, float, bool, type(None), TensorRef, StorageStub, bytearray, complex, slice,
                         _Guarded, type, type(S.StandIn)})  # classes: builtin types and stand-in classes


def check_graph(obj: Any, path: str) -> None:
    """Refuse results a naive walker could not handle: cycles, nesting deeper than MAX_DEPTH, or more than
    MAX_EXPANDED nodes when shared sub-objects are counted once per use."""
    done: dict[int, tuple[int, int]] = {}  # id -> (expanded size, height); `obj` keeps every node alive
    active: set[int] = set()
    leaf_types = _LEAF_TYPES

    def walk(node: Any, depth: int) -> tuple[int, int]:
        nid = id(node)
        got = done.get(nid)
        if got is not None:
            if depth + got[1] > MAX_DEPTH:
                raise CheckpointError(path, f"pickle nests more than {MAX_DEPTH} containers deep")
            return got
        if nid in active:
            raise CheckpointError(path, "pickle object graph contains a cycle")
        if depth > MAX_DEPTH:
            raise CheckpointError(path, f"pickle nests more than {MAX_DEPTH} containers deep")
        active.add(nid)
        total, height = 1, 0
        t = type(node)
        if t is dict:
            parts: tuple[Any, ...] = (node.keys(), node.values())
        elif t is list or t is tuple:
            parts = (node,)
        elif isinstance(node, type):  # a class left in the data (e.g. a dtype class): no children
            parts = ()
        else:
            parts = _parts(node)
            if not isinstance(node, S.StandIn):
                extra = getattr(node, "__dict__", None)
                if extra:  # set by BUILD, e.g. a state dict's `_metadata`
                    _check_attributes(t, extra, path)
                    parts = (*parts, extra.values())
        for part in parts:
            for kid in part:
                if type(kid) in leaf_types:
                    total += 1
                    continue
                size, h = walk(kid, depth + 1)
                total += size
                if h >= height:
                    height = h + 1
        if total > MAX_EXPANDED:
            raise CheckpointError(path, f"pickle object graph expands to more than {MAX_EXPANDED} nodes")
        active.discard(nid)
        done[nid] = (total, height)
        return total, height

    if type(obj) not in leaf_types:
        walk(obj, 0)


def _check_attributes(cls: type, attrs: dict[Any, Any], path: str) -> None:
    """BUILD may add attributes to an OrderedDict, Size or DType instance (torch state dicts carry `_metadata`),
    but none may shadow an attribute of the class (`od.items = ...` would break or fool every reader)."""
    for key in attrs:
        if type(key) is not str or key.startswith("__") or hasattr(cls, key):
            raise CheckpointError(path, f"pickle sets attribute {_brief(key)} on a {cls.__name__} object")


def _parts(node: Any) -> tuple[Any, ...]:
    if isinstance(node, (str, bytes)):
        return ()
    if isinstance(node, dict):
        return (node.keys(), node.values())
    if isinstance(node, (list, tuple, set, frozenset)):
        return (node,)
    if isinstance(node, S.StandIn):
        return (node.__dict__.values(),)
    return ()


@dataclass
class LoadedPickle:
    """The object tree of one file (tensors as TensorRef) and what the unpickler reported."""

    path: str
    obj: Any
    report: PickleReport
    zip_dir: TorchZip | None
    bytes_read: int


def unpickle_bytes(data: bytes, path: str, zip_dir: TorchZip | None = None, base_offset: int = 0, *,
                   storages: bool = True) -> LoadedPickle:
    """Unpickle `data` with the allowlist; errors become one-line CheckpointErrors naming `path`.

    `storages=False` (plain pickles) refuses persistent ids: only torch zip pickles may reference storages."""
    scan_opcodes(data, path)
    report = PickleReport()
    unpickler = RestrictedUnpickler(data, path, zip_dir, report, base_offset, storages=storages)
    try:
        obj = unpickler.load()
        unpickler.check_refs()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(path, "pickle nests too deeply") from None
    except MemoryError:
        raise CheckpointError(path, "pickle asks for too much memory") from None
    except Exception as exc:  # any other failure of a hostile or corrupt stream is the file's fault
        msg = " ".join(str(exc).split())
        raise CheckpointError(path, f"corrupt or unsupported pickle ({type(exc).__name__}: {msg})"[:300]) from None
    check_graph(obj, path)
    return LoadedPickle(path, obj, report, zip_dir, len(data))


def load_torch_metadata(path: str, *, base_offset: int = 0, length: int | None = None) -> LoadedPickle:
    """Read a torch zip checkpoint's object tree without reading any tensor bytes."""
    zip_dir = TorchZip(path, base_offset=base_offset, length=length)
    data = zip_dir.pickle_bytes()
    loaded = unpickle_bytes(data, path, zip_dir, base_offset)
    loaded.bytes_read = zip_dir.bytes_read
    return loaded


def load_plain_pickle(path: str, data: bytes | None = None) -> LoadedPickle:
    """Read a plain pickle file (e.g. a DCP `.metadata`) through the same allowlist."""
    if data is None:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as exc:
            raise CheckpointError(path, f"cannot read ({exc.strerror})") from None
    loaded = unpickle_bytes(data, path, None, storages=False)
    loaded.bytes_read = len(data)
    return loaded
