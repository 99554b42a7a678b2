"""Inert stand-ins for the classes that checkpoint pickles name: they record data and never run foreign code."""

from __future__ import annotations

from typing import Any


class _FrozenClass(type):
    """Metaclass of every stand-in: a pickle (BUILD on a class object) can never change a stand-in class."""

    def __setattr__(cls, name: str, value: Any) -> None:
        raise AttributeError(f"stand-in class {cls.__name__} is read-only")

    def __delattr__(cls, name: str) -> None:
        raise AttributeError(f"stand-in class {cls.__name__} is read-only")


_ARGS = "__si_args__"
_KWARGS = "__si_kwargs__"
_STATE = "__si_state__"


class StandIn(metaclass=_FrozenClass):
    """Records the arguments and pickled state of an object whose real class is never imported.

    Pickled state (BUILD) becomes plain instance fields, except names starting with "__" and names that would
    shadow a method or class attribute of the stand-in; those stay only in `.state`, so a pickle can never
    change the class, the dict or the behaviour of a stand-in.
    """

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        self = object.__new__(cls)
        d = self.__dict__
        d[_ARGS] = args
        d[_KWARGS] = kwargs
        d[_STATE] = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args); nothing to run
        pass

    def __setstate__(self, state: Any) -> None:
        d = self.__dict__
        d[_STATE] = state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] if isinstance(state[0], dict) else {}), **state[1]}
        if isinstance(state, dict):
            cls = type(self)
            for key, value in state.items():
                if isinstance(key, str) and not key.startswith("__") and _settable(cls, key):
                    d[key] = value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"stand-in {type(self).qualname} is read-only")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"stand-in {type(self).qualname} is read-only")

    @property
    def args(self) -> tuple:
        return self.__dict__[_ARGS]

    @property
    def kwargs(self) -> dict:
        return self.__dict__[_KWARGS]

    @property
    def state(self) -> Any:
        return self.__dict__[_STATE]

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __reduce__(self) -> tuple:  # copy / deepcopy keep args, state and fields
        return (_restore, (type(self), dict(self.__dict__)))

    def __repr__(self) -> str:
        fields = StandIn.fields(self)
        inner = ", ".join(f"{k}={_short(v)}" for k, v in fields.items())
        if not inner and self.args:
            inner = ", ".join(_short(a) for a in self.args)
        return f"{type(self).qualname}({inner})"


def _restore(cls: type[StandIn], d: dict[str, Any]) -> StandIn:
    obj = object.__new__(cls)
    obj.__dict__.update(d)
    return obj


_settable_cache: dict[tuple[type, str], bool] = {}


def _settable(cls: type, key: str) -> bool:
    """A pickled field may become an attribute unless a method or class attribute of the stand-in has its name."""
    ok = _settable_cache.get((cls, key))
    if ok is None:
        ok = True
        for klass in cls.__mro__:
            if key in klass.__dict__:
                ok = isinstance(klass.__dict__[key], property)  # a property still wins over the instance dict
                break
        if len(_settable_cache) < 100_000:
            _settable_cache[(cls, key)] = ok
    return ok


def _short(value: Any, limit: int = 200) -> str:
    """repr() for display, bounded: containers are summarised, so a hostile object graph cannot make it explode."""
    if isinstance(value, (str, bytes, int, float, bool, type(None))):
        text = repr(value)
    elif isinstance(value, (list, tuple, dict, set, frozenset)):
        text = f"<{type(value).__name__} of {len(value)}>"
    elif isinstance(value, StandIn):
        text = f"<{type(value).qualname}>"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FragmentAddress(StandIn):
    """deepspeed.utils.tensor_fragment.fragment_address: where a parameter's fragment sits in a flat partition."""

    qualname = "deepspeed.utils.tensor_fragment.fragment_address"
    numel: int
    start: int

    def __setstate__(self, state: Any) -> None:
        StandIn.__setstate__(self, state)
        for key in ("numel", "start"):
            value = self.__dict__.get(key)
            if value is not None and (type(value) is not int or value < 0):
                raise ValueError(f"fragment_address.{key} is not a non-negative int")


class ZeroStage(StandIn):
    """deepspeed.runtime.zero.config.ZeroStageEnum (an int enum)."""

    qualname = "deepspeed.runtime.zero.config.ZeroStageEnum"

    def __new__(cls, *args: Any, **kwargs: Any) -> ZeroStage:
        if args and type(args[0]) is not int:
            raise ValueError("ZeroStageEnum value is not an int")
        return super().__new__(cls, *args, **kwargs)  # type: ignore[return-value]

    @property
    def value(self) -> int:
        if self.args:
            return int(self.args[0])
        return self.state if type(self.state) is int else 0

    def __int__(self) -> int:
        return self.value

    def __repr__(self) -> str:
        return f"ZeroStageEnum({self.value})"


class LossScaler(StandIn):
    """deepspeed.runtime.fp16.loss_scaler.LossScaler / DynamicLossScaler state."""

    qualname = "deepspeed.runtime.fp16.loss_scaler.LossScaler"


class DynamicLossScaler(LossScaler):
    qualname = "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler"


class SubparamShape(StandIn):
    """deepspeed.checkpoint.universal_checkpoint.SubparamShape(patterns, shape, partition_dim)."""

    qualname = "deepspeed.checkpoint.universal_checkpoint.SubparamShape"


class NumpyArray(StandIn):
    """A numpy array (e.g. RNG state): dtype and shape are kept, the raw bytes only as opaque state."""

    qualname = "numpy.ndarray"

    def __repr__(self) -> str:
        return "ndarray(...)"


class NumpyDType(StandIn):
    qualname = "numpy.dtype"


class EnumValue(StandIn):
    """An enum member of a known framework enum (e.g. megatron.core.enums.ModelType)."""

    def __repr__(self) -> str:
        return f"{type(self).qualname}({', '.join(_short(a) for a in self.args)})"


class DataRecord(StandIn):
    """A plain data class of a known library (PyTorch DCP metadata, Megatron metadata extras)."""


class UnknownGlobal(StandIn):
    """A global the allowlist does not know: kept as an inert record and reported, never imported or called."""

    def __repr__(self) -> str:
        return f"<unknown {type(self).qualname}>"


class Opaque(StandIn):
    """A value the reader does not interpret (e.g. a quantized tensor rebuild)."""


_cache: dict[tuple[type, str], type] = {}


def standin_class(base: type[StandIn], qualname: str) -> type[StandIn]:
    """A subclass of `base` named after `qualname` (cached, so identical names share one class; the cache is
    bounded so a stream of hostile files naming endless globals cannot grow it without limit)."""
    key = (base, qualname)
    cls = _cache.get(key)
    if cls is None:
        cls = _FrozenClass(qualname.rsplit(".", 1)[-1], (base,), {"qualname": qualname})
        if len(_cache) < 20_000:
            _cache[key] = cls
    return cls
