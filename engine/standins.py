"""Inert stand-ins for the classes that checkpoint pickles name: they record data and never run foreign code."""

from __future__ import annotations

from typing import Any


class StandIn:
    """Records the arguments and pickled state of an object whose real class is never imported."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "StandIn":
        self = object.__new__(cls)
        self.__dict__["_args"] = args
        self.__dict__["_state"] = None
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # REDUCE calls cls(*args); nothing to run
        pass

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}
        if isinstance(state, dict):
            for key, value in state.items():
                if isinstance(key, str) and not key.startswith("__"):
                    self.__dict__[key] = value

    @property
    def args(self) -> tuple:
        return self.__dict__["_args"]

    @property
    def state(self) -> Any:
        return self.__dict__["_state"]

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.fields().items())
        if not inner and self.args:
            inner = ", ".join(repr(a) for a in self.args)
        return f"{self.qualname}({inner})"


class FragmentAddress(StandIn):
    """deepspeed.utils.tensor_fragment.fragment_address: where a parameter's fragment sits in a flat partition."""

    qualname = "deepspeed.utils.tensor_fragment.fragment_address"
    numel: int
    start: int


class ZeroStage(StandIn):
    """deepspeed.runtime.zero.config.ZeroStageEnum (an int enum)."""

    qualname = "deepspeed.runtime.zero.config.ZeroStageEnum"

    @property
    def value(self) -> int:
        return int(self.args[0]) if self.args else int(self.state or 0)

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
        return f"{self.qualname}({', '.join(map(repr, self.args))})"


class DataRecord(StandIn):
    """A plain data class of a known library (PyTorch DCP metadata, Megatron metadata extras)."""


class UnknownGlobal(StandIn):
    """A global the allowlist does not know: kept as an inert record and reported, never imported or called."""

    def __repr__(self) -> str:
        return f"<unknown {self.qualname}>"


class Opaque(StandIn):
    """A value the reader does not interpret (e.g. a quantized tensor rebuild)."""


_cache: dict[tuple[type, str], type] = {}


def standin_class(base: type[StandIn], qualname: str) -> type[StandIn]:
    """A subclass of `base` named after `qualname` (cached, so identical names share one class)."""
    key = (base, qualname)
    cls = _cache.get(key)
    if cls is None:
        cls = type(qualname.rsplit(".", 1)[-1], (base,), {"qualname": qualname})
        _cache[key] = cls
    return cls
