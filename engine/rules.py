"""Tensor-parallel partition rules, in one place: how each parameter is split over TP ranks and merged back.

Every checkpoint family maps its parameter names onto a `TpSpec` here: DeepSpeed's
`universal_checkpoint_info` patterns (`classify_deepspeed`), and Megatron names (`classify_megatron`).
`merge` and `split` are exact inverses for every rule; the ZeRO→universal conversion, the consolidated
export and the Megatron reshard all call them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


class TpRule(str, Enum):
    """How a parameter is laid out across tensor-parallel ranks."""

    REPLICATED = "replicated"  # every rank holds the whole tensor
    AVERAGE = "average"  # every rank holds a copy that drifted; merged by averaging
    COLUMN = "column"  # split on dim 0
    ROW = "row"  # split on dim 1
    SWIGLU = "swiglu"  # dim 0, two fused halves [gate; up] each split separately
    SUBPARAMS = "subparams"  # several fused sub-parameters along one dim (DeepSpeed SubparamShape)
    QKV = "qkv"  # Megatron fused query_key_value, layout by checkpoint_version
    UNKNOWN = "unknown"  # no rule matched: DeepSpeed's default (dim 0); flagged, refused under --strict

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TpSpec:
    """The rule one parameter follows, with what the rule needs to merge and split it."""

    rule: TpRule
    dim: int | None = None  # partition dim (None: not partitioned)
    vocab: bool = False  # rows are a padded vocabulary: strip to the true size after merging
    sub_sizes: tuple[int, ...] | None = None  # SUBPARAMS: global sizes along `dim` (SwiGLU: 2 equal halves)
    qkv_version: float | None = None  # QKV: Megatron checkpoint_version
    num_heads: int | None = None  # QKV v0 needs nothing more; grouped-query layouts need heads and groups
    num_groups: int | None = None
    pipeline_replicated: bool = False  # tied copy on later pipeline stages: keep stage 0's
    pattern: str | None = None  # the pattern or name rule that chose this spec (for the preview)

    @property
    def partitioned(self) -> bool:
        return self.dim is not None

    @property
    def label(self) -> str:
        text = self.rule.value
        if self.dim is not None and self.rule in (TpRule.COLUMN, TpRule.ROW, TpRule.UNKNOWN):
            text += f" (dim {self.dim})"
        if self.rule == TpRule.QKV and self.qkv_version is not None:
            text += f" v{self.qkv_version:g}"
        elif self.rule == TpRule.QKV:
            grouped = self.num_groups and self.num_heads and self.num_groups < self.num_heads
            text += f" gqa {self.num_groups}/{self.num_heads}" if grouped else " mcore"
        if self.vocab:
            text += " +vocab"
        return text


REPLICATED = TpSpec(TpRule.REPLICATED)


def _matches(patterns: Sequence[str] | None, name: str) -> str | None:
    for pat in patterns or ():
        if re.match(pat, name):
            return pat
    return None


def classify_deepspeed(name: str, uc_info: Mapping[str, Any] | None, tp: int, *,
                       megatron: Mapping[str, Any] | None = None) -> TpSpec:
    """The rule DeepSpeed's `ds_to_universal` applies to `name`, in its order of precedence.

    With `megatron` (keyword arguments of `classify_megatron` except `tp`: the model's `checkpoint_version`,
    `swiglu`, `num_heads`, `num_groups`), a name that no `universal_checkpoint_info` pattern names is
    classified by the Megatron name rules before DeepSpeed's dim-0 default, so a Megatron-DeepSpeed
    `query_key_value` gets its version's QKV rule instead of UNKNOWN. Without it, DeepSpeed's behaviour.
    """
    uc = uc_info or {}
    vocab = _matches(uc.get("vocabulary_parameter_patterns"), name) is not None
    pipe_rep = _matches(uc.get("pipeline_replicated_parameter_patterns"), name) is not None
    extra = {"vocab": vocab, "pipeline_replicated": pipe_rep}
    if (pat := _matches(uc.get("tp_replicated_parameter_patterns"), name)) is not None:
        return TpSpec(TpRule.REPLICATED, None, pattern=pat, **extra)
    if (pat := _matches(uc.get("parameter_to_average_patterns"), name)) is not None:
        return TpSpec(TpRule.AVERAGE, None, pattern=pat, **extra)
    if (pat := _matches(uc.get("parameter_with_2_sub_params_cat_dim_0"), name)) is not None:
        return TpSpec(TpRule.SWIGLU, 0, pattern=pat, **extra)
    for sub in uc.get("parameter_with_sub_params") or ():
        pats = getattr(sub, "patterns", None) or (sub.get("patterns") if isinstance(sub, dict) else None)
        if (pat := _matches(pats, name)) is not None:
            shape = getattr(sub, "shape", None) or (sub.get("shape") if isinstance(sub, dict) else None)
            pdim = getattr(sub, "partition_dim", None)
            if pdim is None and isinstance(sub, dict):
                pdim = sub.get("partition_dim")
            sizes = shape[pdim] if shape is not None and pdim is not None else None
            sizes = tuple(sizes) if isinstance(sizes, (list, tuple)) else None
            return TpSpec(TpRule.SUBPARAMS, int(pdim or 0), sub_sizes=sizes, pattern=pat, **extra)
    if (pat := _matches(uc.get("parameter_with_row_parallelism_patterns"), name)) is not None:
        return TpSpec(TpRule.ROW, 1, pattern=pat, **extra)
    if vocab:
        return TpSpec(TpRule.COLUMN, 0, pattern="vocabulary", **extra)
    if (spec := _affine_map_spec(name, uc.get("affine_map"), extra)) is not None:
        return spec
    if megatron is not None:
        spec = classify_megatron(name, tp=tp, **{"checkpoint_version": None, **megatron})
        if spec.rule != TpRule.UNKNOWN:
            return replace(spec, pipeline_replicated=spec.pipeline_replicated or pipe_rep)
    if tp == 1:
        return TpSpec(TpRule.COLUMN, 0, pattern=None, **extra)
    return TpSpec(TpRule.UNKNOWN, 0, pattern=None, **extra)


def _affine_map_spec(name: str, affine: Any, extra: dict[str, Any]) -> TpSpec | None:
    """DeepSpeed AutoTP records each partitioned parameter's logical and per-rank shapes (`affine_map`, UCP 0.4):
    the dim where a rank's shard is smaller than the logical shape is the partition dim."""
    params = affine.get("params") if isinstance(affine, dict) else None
    for pat, info in (params or {}).items():
        if not re.match(pat, name) or not isinstance(info, dict):
            continue
        logical = list(info.get("logical_shape") or ())
        ranks = info.get("ranks") or {}
        shard = next((list(r.get("shard_shape") or ()) for r in ranks.values() if isinstance(r, dict)), None)
        if not logical or shard is None or len(shard) != len(logical):
            return None
        dims = [d for d, (a, b) in enumerate(zip(shard, logical)) if a != b]
        if len(dims) != 1:
            return None
        return TpSpec(TpRule.COLUMN if dims[0] == 0 else TpRule.ROW, dims[0], pattern=pat, **extra)
    return None


@dataclass(frozen=True)
class NameRule:
    """One Megatron name rule: parameters whose name matches `pattern` (re.search) follow `rule`."""

    pattern: str
    rule: TpRule
    dim: int | None = None
    vocab: bool = False
    swiglu_aware: bool = False  # fused [gate; up] MLP input: SWIGLU when the model uses SwiGLU, else COLUMN
    pipeline_replicated: bool = False
    family: str = "megatron"  # which naming the rule is written for: legacy (Megatron-LM/-DeepSpeed) | core | both
    note: str = ""


# The single table of Megatron name rules, in precedence order (the first match wins). Legacy = Megatron-LM
# pre-mcore and Megatron-DeepSpeed (`language_model.encoder.layers.N.*`, DeepSpeed pipe layer names `N.*`);
# core = Megatron-Core (`decoder.layers.N.*`). Sources: formats/megatron-dcp-safety.md §1.3-1.6, deepspeed.md §5.2.
_NORM = r"(layernorm|layer_norm|(^|\.)[a-z_]*norm\.(weight|bias)$)"
MEGATRON_RULES: tuple[NameRule, ...] = (
    NameRule(_NORM, TpRule.REPLICATED, family="both",
             note="every norm (incl. TE fused linear_*.layer_norm_*, q/k_layernorm)"),
    NameRule(r"(^|\.)(self_)?attention\.query_key_value\.(weight|bias)$", TpRule.QKV, 0, family="legacy",
             note="fused QKV; row order by checkpoint_version (0: [3,np,hn], 1.0: [np,hn,3], 2.0/3.0: [np,3,hn])"),
    NameRule(r"(^|\.)linear_qkv\.(weight|bias)$", TpRule.QKV, 0, family="core",
             note="fused QKV, per query group [q x np/ng, k, v]"),
    NameRule(r"(^|\.)(self_)?attention\.dense\.weight$", TpRule.ROW, 1, family="legacy"),
    NameRule(r"(^|\.)mlp\.dense_4h_to_h\.weight$", TpRule.ROW, 1, family="legacy"),
    NameRule(r"(^|\.)linear_proj\.weight$", TpRule.ROW, 1, family="core"),
    NameRule(r"(^|\.)linear_fc2\.weight\d*$", TpRule.ROW, 1, family="core", note="also TEGroupedMLP weight<j>"),
    NameRule(r"(^|\.)mlp\.dense_h_to_4h\.(weight|bias)$", TpRule.COLUMN, 0, swiglu_aware=True, family="legacy"),
    NameRule(r"(^|\.)linear_fc1\.(weight|bias)\d*$", TpRule.COLUMN, 0, swiglu_aware=True, family="core"),
    NameRule(r"(^|\.)word_embeddings\.weight$", TpRule.COLUMN, 0, vocab=True, family="both"),
    NameRule(r"(^|\.)word_embeddings_for_head\.weight$", TpRule.COLUMN, 0, vocab=True, pipeline_replicated=True,
             family="legacy", note="last stage's copy of the tied word embeddings"),
    NameRule(r"(^|\.)(final_linear|lm_head|output_layer)\.weight$", TpRule.COLUMN, 0, vocab=True, family="both"),
    NameRule(r"(^|\.)(self_)?attention\.dense\.bias$", TpRule.REPLICATED, family="legacy"),
    NameRule(r"(^|\.)mlp\.dense_4h_to_h\.bias$", TpRule.REPLICATED, family="legacy"),
    NameRule(r"(^|\.)(linear_proj|linear_fc2)\.bias\d*$", TpRule.REPLICATED, family="core",
             note="row-parallel bias: added after the all-reduce"),
    NameRule(r"(^|\.)(position_embeddings|tokentype_embeddings)\.weight$", TpRule.REPLICATED, family="both"),
    NameRule(r"(^|\.)router\.(weight|bias|expert_bias)$", TpRule.REPLICATED, family="core", note="MoE router"),
    NameRule(r"(^|\.)(linear_q_down_proj|linear_kv_down_proj)\.weight$", TpRule.REPLICATED, family="core",
             note="MLA down projections are duplicated on every TP rank"),
    NameRule(r"(^|\.)(linear_q_up_proj|linear_kv_up_proj|linear_q_proj)\.weight$", TpRule.COLUMN, 0, family="core",
             note="MLA up projections"),
)


def classify_megatron(name: str, *, checkpoint_version: float | None, swiglu: bool = False, tp: int = 1,
                      num_heads: int | None = None, num_groups: int | None = None) -> TpSpec:
    """The TP rule of a Megatron parameter, by name (`MEGATRON_RULES`, first match wins).

    `checkpoint_version` picks the legacy `query_key_value` row order (None = 0, as Megatron and DeepSpeed
    assume when the key is missing); Megatron-Core `linear_qkv` is always grouped per query group
    (`num_groups` < `num_heads`: grouped-query attention; otherwise plain multi-head, the v2.0 order).
    `tp` is the checkpoint's TP degree: it does not change the rule (names decide; an unknown name is
    UNKNOWN dim 0 even at tp=1, never silently known), it is recorded in the pattern text for the preview.
    """
    for rule in MEGATRON_RULES:
        if re.search(rule.pattern, name) is None:
            continue
        extra = {"vocab": rule.vocab, "pipeline_replicated": rule.pipeline_replicated, "pattern": rule.pattern}
        if rule.rule == TpRule.QKV:
            legacy = rule.family == "legacy"
            version = (0.0 if checkpoint_version is None else float(checkpoint_version)) if legacy else None
            groups = num_groups if num_groups else num_heads
            return TpSpec(TpRule.QKV, 0, qkv_version=version, num_heads=num_heads, num_groups=groups, **extra)
        if rule.swiglu_aware and swiglu:
            return TpSpec(TpRule.SWIGLU, 0, **extra)
        return TpSpec(rule.rule, rule.dim, **extra)
    return TpSpec(TpRule.UNKNOWN, 0, pattern=f"no Megatron name rule (tp={tp})")


def rule_table() -> list[dict[str, Any]]:
    """Every Megatron name rule, in precedence order, as plain rows (for docs and the preview)."""
    rows = []
    for r in MEGATRON_RULES:
        label = TpSpec(r.rule, r.dim, vocab=r.vocab).label
        if r.swiglu_aware:
            label += " | swiglu (with --swiglu)"
        rows.append({"pattern": r.pattern, "rule": label, "family": r.family, "note": r.note})
    rows.append({"pattern": "(anything else)", "rule": TpSpec(TpRule.UNKNOWN, 0).label, "family": "both",
                 "note": "flagged in the preview; refused under --strict"})
    return rows


def global_shape(spec: TpSpec, local_shapes: Sequence[Sequence[int]]) -> tuple[int, ...]:
    """The merged (padded) shape from each TP rank's local shape."""
    first = tuple(int(s) for s in local_shapes[0])
    if spec.dim is None or len(local_shapes) == 1 or not first:
        return first
    out = list(first)
    out[spec.dim] = sum(int(s[spec.dim]) for s in local_shapes)
    return tuple(out)


def local_shape(spec: TpSpec, full_shape: Sequence[int], tp: int) -> tuple[int, ...]:
    """The shape each of `tp` ranks holds of a `full_shape` tensor (raises ValueError if it does not divide)."""
    shape = list(full_shape)
    if spec.dim is None or tp == 1:
        return tuple(shape)
    if shape[spec.dim] % tp:
        raise ValueError(f"dim {spec.dim} of size {shape[spec.dim]} does not divide by tp={tp}")
    if spec.rule == TpRule.SWIGLU and (shape[spec.dim] // 2) % tp:
        raise ValueError(f"SwiGLU halves of size {shape[spec.dim] // 2} do not divide by tp={tp}")
    if spec.rule == TpRule.QKV:
        from .qkv import check_qkv_split

        check_qkv_split(spec, shape[spec.dim], tp)
    shape[spec.dim] //= tp
    return tuple(shape)


def _halves(spec: TpSpec, total: int) -> tuple[int, ...]:
    if spec.rule == TpRule.SWIGLU:
        return (total // 2, total // 2)
    if spec.sub_sizes and sum(spec.sub_sizes) == total:
        return spec.sub_sizes
    if spec.sub_sizes and len(spec.sub_sizes) > 0:
        n = len(spec.sub_sizes)
        return tuple([total // n] * n)
    return (total,)


def merge(spec: TpSpec, slices: Sequence[torch.Tensor], *, check_replicated: bool = True) -> torch.Tensor:
    """Merge per-rank slices (in TP rank order) into the global tensor; vocabulary padding is kept."""
    import torch

    if len(slices) == 1:
        return slices[0]
    if spec.rule == TpRule.REPLICATED:
        if check_replicated:
            for i, s in enumerate(slices[1:], 1):
                if not torch.equal(slices[0], s):
                    raise ValueError(f"replicated slices differ between TP rank 0 and TP rank {i}")
        return slices[0]
    if spec.rule == TpRule.AVERAGE:
        return sum(slices) / len(slices)
    dim = spec.dim if spec.dim is not None else 0
    if spec.rule in (TpRule.SWIGLU, TpRule.SUBPARAMS):
        parts_per_rank = [torch.split(s, list(_halves_local(spec, s.shape[dim], len(slices))), dim=dim)
                          for s in slices]
        n = len(parts_per_rank[0])
        return torch.cat([torch.cat([p[k] for p in parts_per_rank], dim=dim) for k in range(n)], dim=dim)
    if spec.rule == TpRule.QKV:
        from .qkv import merge_qkv

        return merge_qkv(spec, slices)
    return torch.cat(list(slices), dim=dim)


def _halves_local(spec: TpSpec, local_total: int, tp: int) -> tuple[int, ...]:
    if spec.rule == TpRule.SWIGLU:
        return (local_total // 2, local_total // 2)
    if spec.sub_sizes and sum(spec.sub_sizes) == local_total * tp:
        return tuple(s // tp for s in spec.sub_sizes)
    n = len(spec.sub_sizes) if spec.sub_sizes else 1
    return tuple([local_total // n] * n)


def split(spec: TpSpec, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """Split a global tensor into `tp` rank slices (the inverse of `merge`)."""
    import torch

    if tp == 1:
        return [full]
    if spec.dim is None:
        return [full.clone() for _ in range(tp)]
    dim = spec.dim
    local_shape(spec, full.shape, tp)  # validates divisibility
    if spec.rule in (TpRule.SWIGLU, TpRule.SUBPARAMS):
        parts = torch.split(full, list(_halves(spec, full.shape[dim])), dim=dim)
        pieces = [torch.chunk(p, tp, dim=dim) for p in parts]
        return [torch.cat([pc[r] for pc in pieces], dim=dim).contiguous() for r in range(tp)]
    if spec.rule == TpRule.QKV:
        from .qkv import split_qkv

        return split_qkv(spec, full, tp)
    return [c.contiguous() for c in torch.chunk(full, tp, dim=dim)]


def strip_vocab(tensor: torch.Tensor, true_vocab: int | None) -> torch.Tensor:
    """Drop vocabulary padding rows (keeps the first `true_vocab` rows)."""
    if true_vocab is None or tensor.dim() == 0 or tensor.shape[0] <= true_vocab:
        return tensor
    return tensor.narrow(0, 0, true_vocab)


def padded_vocab_size(true_vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron's padding: the next multiple of `divisible_by * tp`."""
    multiple = divisible_by * tp
    return ((true_vocab + multiple - 1) // multiple) * multiple
