"""torch.save for outputs that must name DeepSpeed classes (loss scaler, ZeRO stage) without importing DeepSpeed."""

from __future__ import annotations

import copyreg
import os
import pickle
import types
from typing import Any

from ..atomic import temp_path
from ..standins import EnumValue, StandIn, ZeroStage
from ..tensorref import DType, Size, TensorRef


class _StandInPickler(pickle._Pickler):  # type: ignore[name-defined]
    """Pickles stand-ins back under their original global names; no import of those modules is attempted."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, DType):  # torch.float16 and friends, as torch pickles them: GLOBAL torch <name>
            return str(obj)
        if isinstance(obj, Size):
            return (_named_global("torch.Size"), (tuple(obj),))
        if isinstance(obj, StandIn):
            cls = _named_global(obj.qualname)
            if isinstance(obj, (ZeroStage, EnumValue)):
                return (cls, tuple(obj.args))
            if obj.qualname.endswith("._reconstruct"):  # made by calling a function: call it again on load
                return (cls, tuple(obj.args), obj.state)
            return (copyreg.__newobj__, (cls, *obj.args), obj.state)
        return NotImplemented

    def save_reduce(self, func: Any, args: Any, *rest: Any, obj: Any = None, **kw: Any) -> None:
        if func is copyreg.__newobj__ and args and isinstance(args[0], _GlobalName):
            obj = None  # the class check and memo would compare against the stand-in's own class
        super().save_reduce(func, args, *rest, obj=obj, **kw)

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if isinstance(obj, type) and issubclass(obj, StandIn):  # a stand-in class inside another's arguments
            obj = _named_global(obj.qualname)
        if isinstance(obj, DType):
            obj = _named_global(f"torch.{obj}")
        if isinstance(obj, _GlobalName):
            module, _, qual = obj.qualname.rpartition(".")
            self.write(pickle.GLOBAL + f"{module}\n{qual}\n".encode())
            self.memoize(obj)
            return
        super().save_global(obj, name)


class _GlobalName:
    """A reference to a global by dotted name, pickled as a GLOBAL opcode."""

    def __init__(self, qualname: str) -> None:
        self.qualname = qualname

    def __reduce__(self) -> str:  # pickled through save_global
        return self.qualname

    def __call__(self, *args: Any) -> Any:
        raise TypeError(f"{self.qualname} is a name to pickle, not a callable")


_names: dict[str, _GlobalName] = {}


def _named_global(qualname: str) -> _GlobalName:
    g = _names.get(qualname)
    if g is None:
        g = _names[qualname] = _GlobalName(qualname)
    return g


class _PickleModule(types.ModuleType):
    Pickler = _StandInPickler
    Unpickler = pickle.Unpickler


_pickle_module = _PickleModule("ckpt_explorer_pickle")
_pickle_module.__dict__.update({k: getattr(pickle, k) for k in ("dump", "dumps", "load", "loads", "HIGHEST_PROTOCOL",
                                                                "DEFAULT_PROTOCOL")})


def materialize(obj: Any) -> Any:
    """Replace TensorRefs in an object tree by real tensors (read through mmap); other values are kept."""
    from ..tensor_io import read_tensor

    if isinstance(obj, TensorRef):
        return read_tensor(obj)
    if isinstance(obj, DType):
        import torch

        return getattr(torch, str(obj))
    if isinstance(obj, Size):
        import torch

        return torch.Size(obj)
    if isinstance(obj, dict):
        return type(obj)((k, materialize(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [materialize(v) for v in obj]
    if isinstance(obj, tuple) and not isinstance(obj, Size):
        return tuple(materialize(v) for v in obj)
    return obj


def save_atomic(obj: Any, path: str, *, standins: bool = False) -> int:
    """torch.save to `path` through a temporary file and a rename; returns the bytes written."""
    import torch

    tmp = temp_path(path)
    with open(tmp, "wb") as fh:
        if standins:
            torch.save(obj, fh, pickle_module=_pickle_module)
        else:
            torch.save(obj, fh)
        fh.flush()
    os.replace(tmp, path)
    return os.path.getsize(path)
