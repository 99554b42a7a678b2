"""Conversion plans as plain data: what each output item reads, how it merges, what it writes, and the totals.

`plan_conversion(ckpt, target)` is the one entry point. The preview renders the returned `Plan`, the CLI
prints it for `--dry-run`, and every executor (local process pool, Dask) runs exactly its items.
Items are self-contained and picklable (paths, offsets, rules; no open handles) and idempotent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import PlanError
from .layout import Checkpoint, Param
from .rules import TpSpec

TARGET_KINDS = ("universal", "safetensors", "torch", "reshard")
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float32": "float32", "bfloat16": "bfloat16",
          "float16": "float16"}


@dataclass(frozen=True)
class Target:
    """What the user wants: a layout and format to convert to."""

    kind: str  # universal | safetensors | torch | reshard
    dtype: str | None = None  # consolidated output dtype (torch name); None = float32 master weights
    tp: int | None = None  # reshard target degrees (None = unchanged)
    pp: int | None = None
    quantize: str | None = None  # "int8"
    groups: int = 64
    mlp_extra_grouping: bool = True
    max_shard_size: int = 5 * 10**9
    strict: bool = False
    tag: str | None = None  # output tag (universal: "<tag>_universal")

    def describe(self) -> str:
        if self.kind == "reshard":
            text = f"reshard to tp={self.tp} pp={self.pp}"
            return text + (f", {self.quantize} ({self.groups} groups)" if self.quantize else "")
        if self.kind in ("safetensors", "torch"):
            return f"consolidated {self.kind} ({self.dtype or 'float32'})"
        return "DeepSpeed universal checkpoint"


@dataclass(frozen=True)
class PlanItem:
    """One unit of work: typically one output parameter with all its states, or one file to copy."""

    id: str
    kind: str  # universal_param | tensor | torch_shard | copy | write_file | reshard_rank
    name: str
    rule: str = ""
    spec: TpSpec | None = None
    param: Param | None = None
    outputs: tuple[str, ...] = ()  # paths relative to the output root
    target_shapes: tuple[tuple[int, ...], ...] = ()  # per new rank (one entry when consolidated)
    read_bytes: int = 0
    write_bytes: int = 0
    peak_bytes: int = 0
    flags: tuple[str, ...] = ()
    args: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Plan:
    """Everything a conversion will do, computed before any byte moves."""

    source_path: str
    source_format: str
    target: Target
    items: tuple[PlanItem, ...]
    layout_dirs: tuple[str, ...] = ()  # directories to create under the output root
    finalize: tuple[PlanItem, ...] = ()  # items that run after all others (indices, tracker files)
    warnings: tuple[str, ...] = ()
    source_degrees: str = ""
    target_degrees: str = ""

    @property
    def read_bytes(self) -> int:
        return sum(i.read_bytes for i in self.all_items)

    @property
    def write_bytes(self) -> int:
        return sum(i.write_bytes for i in self.all_items)

    @property
    def disk_needed(self) -> int:
        """Bytes the destination filesystem must have free (output is written once, no temp copies)."""
        return self.write_bytes

    @property
    def peak_memory(self) -> int:
        """Estimated peak memory of one worker: the largest item's working set."""
        return max((i.peak_bytes for i in self.all_items), default=0)

    @property
    def all_items(self) -> tuple[PlanItem, ...]:
        return self.items + self.finalize

    @property
    def flagged(self) -> tuple[PlanItem, ...]:
        return tuple(i for i in self.items if i.flags)


def item_tensor_rows(item: PlanItem) -> list[tuple[str, str, tuple[int, ...] | None]]:
    """(tensor name, rule label, shape on the new rank) for each tensor a file-level item writes (reshards)."""
    rows = []
    for t in item.args.get("tensors") or ():
        spec = t.get("spec")
        label = t.get("label") or (spec.label if spec is not None else "")
        local = t.get("local")
        rows.append((str(t.get("name") or t.get("key")), label,
                     tuple(local) if isinstance(local, (tuple, list)) else None))
    return rows


def plan_conversion(ckpt: Checkpoint, target: Target) -> Plan:
    """The plan that turns `ckpt` into `target` (raises PlanError when it cannot be done)."""
    if target.kind not in TARGET_KINDS:
        raise PlanError(f"unknown target {target.kind!r} (choose from {', '.join(TARGET_KINDS)})")
    if target.dtype is not None and target.dtype not in DTYPES.values():
        raise PlanError(f"unknown dtype {target.dtype!r}")
    if target.quantize is not None and target.kind != "reshard":
        raise PlanError("int8 quantization applies to `reshard` (Megatron weights), not to this conversion")
    if target.dtype is not None and target.kind not in ("safetensors", "torch"):
        raise PlanError("--dtype applies to consolidated exports (safetensors/torch); a reshard keeps the dtype")
    if target.kind == "universal":
        from .plan_universal import plan_universal

        return plan_universal(ckpt, target)
    if target.kind in ("safetensors", "torch"):
        from .plan_consolidated import plan_consolidated

        return plan_consolidated(ckpt, target)
    from .plan_reshard import plan_reshard

    return plan_reshard(ckpt, target)
