"""Restricted unpickling of torch checkpoints: an allowlist, inert stand-ins, and tensors as metadata only."""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

from . import standins as S
from .errors import CheckpointError, UnsafePickleError
from .tensorref import STORAGE_DTYPES, DType, Size, StorageStub, TensorRef
from .torchzip import TorchZip

_TORCH_DTYPES = {
    "float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32", "int",
    "int16", "short", "int8", "uint8", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
    "uint16", "uint32", "uint64",
}
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64", "int": "int32",
                  "short": "int16"}

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


@dataclass
class PickleReport:
    """What one unpickling saw: tensors it described and globals it refused to resolve."""

    tensors: list[TensorRef] = field(default_factory=list)
    unknown_globals: set[str] = field(default_factory=set)


def _rebuild_from_type(func: Any, new_type: Any, args: tuple, state: Any) -> Any:
    if func is _REBUILD_MARKERS["_rebuild_tensor_v2"] or func is _REBUILD_MARKERS["_rebuild_tensor"]:
        return func(*args)
    return S.standin_class(S.Opaque, "torch._tensor._rebuild_from_type_v2")(func, args)


_REBUILD_MARKERS: dict[str, Callable[..., Any]] = {}


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only allowlisted globals; everything else becomes an inert, reported stand-in."""

    def __init__(self, data: bytes, path: str, zip_dir: TorchZip | None, report: PickleReport,
                 base_offset: int = 0) -> None:
        super().__init__(io.BytesIO(data))
        self.path = path
        self.zip_dir = zip_dir
        self.report = report
        self.base_offset = base_offset

    # torch.save writes ('storage', StorageClass, key, location, numel)
    def persistent_load(self, pid: Any) -> Any:
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 5:
            raise UnsafePickleError(self.path, f"unexpected persistent id {str(pid)[:80]!r}")
        _, storage_type, key, _location, numel = pid[:5]
        dtype = storage_type if isinstance(storage_type, str) else "uint8"
        if not isinstance(numel, int) or numel < 0:
            raise CheckpointError(self.path, f"storage {key!r} has an invalid element count")
        return StorageStub(str(key), dtype, numel)

    def _rebuild_tensor(self, storage: Any, storage_offset: int, size: Any, stride: Any, *rest: Any) -> TensorRef:
        if not isinstance(storage, StorageStub):
            raise CheckpointError(self.path, "tensor rebuild without a storage record")
        ref = TensorRef(self.path, storage.key, storage.dtype, tuple(int(s) for s in size),
                        tuple(int(s) for s in stride), int(storage_offset), storage.numel, self.base_offset)
        if storage_offset < 0 or any(s < 0 for s in ref.shape) or any(s < 0 for s in ref.stride):
            raise CheckpointError(self.path, f"tensor in storage {storage.key} has a negative offset or size")
        if ref.extent() > storage.numel:
            raise CheckpointError(
                self.path,
                f"tensor in storage {storage.key} reaches element {ref.extent()} of a {storage.numel}-element storage",
            )
        if self.zip_dir is not None:
            rec = self.zip_dir.records.get(f"{self.zip_dir.prefix}data/{storage.key}")
            itemsize = ref.itemsize or 1
            if rec is None:
                raise CheckpointError(self.path, f"storage record data/{storage.key} is missing from the zip")
            if storage.numel * itemsize > rec.size:
                raise CheckpointError(
                    self.path,
                    f"storage data/{storage.key} declares {storage.numel * itemsize} bytes but the file holds "
                    f"{rec.size} (corrupt or truncated)",
                )
            if rec.header_offset + rec.size > self.zip_dir.length:
                raise CheckpointError(self.path, f"storage data/{storage.key} points outside the file")
        self.report.tensors.append(ref)
        return ref

    def find_class(self, module: str, name: str) -> Any:
        if module == "__builtin__":
            module = "builtins"
        if module == "copy_reg":
            module = "copyreg"
        qual = f"{module}.{name}"
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "builtins" and name in ("set", "frozenset", "slice", "complex", "bytearray"):
            return {"set": set, "frozenset": frozenset, "slice": slice, "complex": complex,
                    "bytearray": bytearray}[name]
        if module == "_codecs" and name == "encode":
            return _safe_encode
        if module == "torch":
            if name in STORAGE_DTYPES:
                return STORAGE_DTYPES[name][0]
            if name in _TORCH_DTYPES:
                return DType(_DTYPE_ALIASES.get(name, name))
            if name == "Size":
                return Size
            if name == "Tensor" or name == "nn.Parameter":
                return S.standin_class(S.Opaque, qual)
            if name == "device":
                return _device
        if module == "torch.storage" and name in ("UntypedStorage", "TypedStorage"):
            return "uint8"
        if module == "torch._utils":
            if name in ("_rebuild_tensor_v2", "_rebuild_tensor", "_rebuild_tensor_v3"):
                return self._rebuild_tensor
            if name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
                return _rebuild_parameter
        if module == "torch._tensor" and name == "_rebuild_from_type_v2":
            return self._rebuild_from_type
        if module == "torch.nn.parameter" and name == "Parameter":
            return S.standin_class(S.Opaque, qual)
        if module == "torch.serialization" and name == "_get_layout":
            return str
        if module == "argparse" and name == "Namespace":
            return S.standin_class(S.DataRecord, "argparse.Namespace")
        if module in ("types",) and name == "SimpleNamespace":
            return S.standin_class(S.DataRecord, qual)
        if module in ("pathlib",) and name in ("PosixPath", "PurePosixPath", "Path", "WindowsPath"):
            return _path
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return S.standin_class(S.NumpyArray, "numpy.ndarray") if name == "_reconstruct" else _numpy_scalar
        if qual in _KNOWN_STANDINS:
            return _KNOWN_STANDINS[qual]
        if qual.startswith(_KNOWN_PREFIXES_ENUM):
            return S.standin_class(S.EnumValue, qual)
        if qual.startswith(_KNOWN_DATA_PREFIXES):
            return S.standin_class(S.DataRecord, qual)
        if module == "copyreg" and name == "_reconstructor":
            return _reconstructor
        self.report.unknown_globals.add(qual)
        return S.standin_class(S.UnknownGlobal, qual)

    def _rebuild_from_type(self, func: Any, new_type: Any, args: tuple, state: Any) -> Any:
        if func == self._rebuild_tensor:
            return func(*args)
        return S.standin_class(S.Opaque, "torch._tensor._rebuild_from_type_v2")(args)


def _rebuild_parameter(data: Any, *_: Any) -> Any:
    return data


def _safe_encode(obj: Any, encoding: str = "latin1") -> bytes:
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii"):
        raise pickle.UnpicklingError("unexpected _codecs.encode call")
    return obj.encode(encoding)


def _device(*args: Any) -> str:
    return "device(" + ", ".join(str(a) for a in args) + ")"


def _path(*parts: Any) -> str:
    return "/".join(str(p) for p in parts)


def _numpy_scalar(*args: Any) -> Any:
    return S.standin_class(S.Opaque, "numpy.scalar")(*args)


def _reconstructor(cls: Any, base: Any, state: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, S.StandIn):
        return cls(state)
    if cls is OrderedDict:
        return OrderedDict()
    raise pickle.UnpicklingError("copyreg._reconstructor on a non-allowlisted class")


@dataclass
class LoadedPickle:
    """The object tree of one file (tensors as TensorRef) and what the unpickler reported."""

    path: str
    obj: Any
    report: PickleReport
    zip_dir: TorchZip | None
    bytes_read: int


def unpickle_bytes(data: bytes, path: str, zip_dir: TorchZip | None = None, base_offset: int = 0) -> LoadedPickle:
    """Unpickle `data` with the allowlist; errors become one-line CheckpointErrors naming `path`."""
    report = PickleReport()
    unpickler = RestrictedUnpickler(data, path, zip_dir, report, base_offset)
    try:
        obj = unpickler.load()
    except CheckpointError:
        raise
    except RecursionError:
        raise CheckpointError(path, "pickle nests too deeply") from None
    except MemoryError:
        raise CheckpointError(path, "pickle asks for too much memory") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError, ImportError) as exc:
        raise CheckpointError(path, f"corrupt or unsupported pickle ({type(exc).__name__}: {exc})"[:300]) from None
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
    loaded = unpickle_bytes(data, path, None)
    loaded.bytes_read = len(data)
    return loaded
