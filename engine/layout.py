"""The layout model: runs, iterations, degrees, files and parameters as frozen dataclasses (metadata only)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from math import prod
from typing import Any

from .tensorref import ITEMSIZE, TensorRef


class Format(str, Enum):
    """Checkpoint families the engine reads."""

    DEEPSPEED = "deepspeed"
    UNIVERSAL = "universal"
    MEGATRON = "megatron"  # Megatron-LM legacy iter_*/mp_rank_*/model_optim_rng.pt
    TORCH_DIST = "torch_dist"  # Megatron-Core dist checkpoint (DCP underneath)
    DCP = "dcp"  # plain PyTorch distributed checkpoint
    SAFETENSORS = "safetensors"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Degrees:
    """Parallel degrees of one checkpoint."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    ep: int = 1

    def __str__(self) -> str:
        text = f"tp={self.tp} pp={self.pp} dp={self.dp}"
        return text + (f" ep={self.ep}" if self.ep > 1 else "")


@dataclass(frozen=True)
class RankFile:
    """One file of a checkpoint, with the ranks it belongs to (None where the axis does not apply)."""

    path: str
    role: str  # model_states | optim_states | layer | expert | model_optim_rng | distrib_optim | distcp | ...
    size: int
    tp: int | None = None
    pp: int | None = None
    dp: int | None = None
    ep: int | None = None
    layer: int | None = None


@dataclass(frozen=True)
class Fragment:
    """A contiguous run of one parameter's elements (of one state) inside one tensor of one file."""

    state: str  # fp32 | exp_avg | exp_avg_sq | weight (the model-dtype copy)
    tensor: TensorRef  # the tensor that holds it (a flat partition or the whole parameter)
    src_start: int  # first element inside `tensor` (row-major order)
    numel: int
    dst_start: int  # first element inside this TP rank's local parameter (row-major order)
    tp: int = 0
    pp: int = 0
    dp: int = 0


@dataclass(frozen=True)
class Shard:
    """The local shape one tensor-parallel rank (of one pipeline stage) holds."""

    tp: int
    pp: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Param:
    """One parameter: global (logical) shape, how it is partitioned, and exactly where its bytes are."""

    name: str
    shape: tuple[int, ...]  # global logical shape (vocabulary padding stripped where recorded)
    dtype: str  # dtype of the model weights (torch name, e.g. 'bfloat16')
    shards: tuple[Shard, ...] = ()
    partition_dim: int | None = None
    rule: str = "replicated"  # a rules.TpRule value
    frozen: bool = False
    tied_to: str | None = None
    fragments: tuple[Fragment, ...] = ()
    padded_shape: tuple[int, ...] | None = None  # global shape before vocabulary padding was stripped
    flags: tuple[str, ...] = ()  # notes for the preview, e.g. "unknown name: default dim-0 rule"

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE.get(self.dtype, 4)

    @property
    def states(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for frag in self.fragments:
            seen.setdefault(frag.state, None)
        return tuple(seen)

    def fragments_of(self, state: str) -> tuple[Fragment, ...]:
        return tuple(f for f in self.fragments if f.state == state)


@dataclass(frozen=True)
class IterationRef:
    """An iteration found by discovery, not yet read."""

    run_root: str
    path: str  # the tag / iter directory (or the file, for single-file formats)
    tag: str
    iteration: int | None
    latest: bool
    format: Format


@dataclass(frozen=True)
class Run:
    """A checkpoint root: one training run's iterations."""

    root: str
    format: Format
    iterations: tuple[IterationRef, ...]
    latest_tag: str | None = None


@dataclass(frozen=True)
class Checkpoint:
    """One iteration, read from metadata: degrees, files, parameters and their fragments."""

    path: str
    run_root: str
    format: Format
    tag: str
    iteration: int | None
    latest: bool
    degrees: Degrees
    zero_stage: int | None
    dtype: str | None  # model dtype, torch name
    optimizer: str | None  # e.g. "ZeRO-2 (DeepSpeedZeroOptimizer)", "BF16_Optimizer", None
    optimizer_states: tuple[str, ...]  # fp32, exp_avg, exp_avg_sq, step — what the optimizer holds
    files: tuple[RankFile, ...]
    params: tuple[Param, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.params if p.tied_to is None)
