"""Megatron-LM legacy checkpoints (`iter_XXXXXXX/mp_rank_XX[_YYY[_ZZZ]]/model_optim_rng.pt`): discovery and layout.

Layout facts: formats/megatron-dcp-safety.md §1. A run root holds `latest_checkpointed_iteration.txt` (an
iteration number or `release`) and `iter_%07d/` (or `release/`) folders with one `mp_rank_*` folder per
(tp, pp, ep) shard. A single 3-digit suffix is a pipeline rank or an expert rank; `args` decides. Layer
indices restart at 0 on every pipeline stage and are renumbered here to global indices.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import CheckpointError
from ..layout import Checkpoint, Degrees, Format, Fragment, IterationRef, Param, RankFile, Run, Shard
from ..rules import TpRule, TpSpec, classify_megatron, global_shape
from ..safe_unpickle import load_torch_metadata
from ..tensorref import TensorRef
from .base import CheckpointFormat, DirListing, register

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
DISTRIB_FILE = "distrib_optim.pt"
_ITER_RE = re.compile(r"^iter_(\d{7,})$")
_RANK_RE = re.compile(r"^mp_rank_(\d{2,})(?:_(\d{3,}))?(?:_(\d{3,}))?$")
_CHUNK_RE = re.compile(r"^model(\d+)$")
_LAYER_RE = re.compile(r"(?:^|(?<=\.))layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"(local_experts\.)(\d+)(\.)|(\.weight|\.bias)(\d+)$")
_MAX_WORKERS = 16
T = TypeVar("T")
R = TypeVar("R")
_TRUE_VOCAB_ARGS = ("true_vocab_size", "original_vocab_size", "orig_vocab_size")  # never `vocab_size`: +1 EOD


def _pmap(fn: Callable[[T], R], items: list[T]) -> list[R]:
    """Map over many small pickle reads; a thread pool once there are enough to overlap I/O."""
    if len(items) < 16:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, len(items))) as ex:
        return list(ex.map(fn, items))


def _is_legacy_iteration(listing: DirListing) -> bool:
    return any(_RANK_RE.match(d) for d in listing.dirs) and "metadata.json" not in listing.file_set


def _iteration_of(tag: str) -> int | None:
    m = _ITER_RE.match(tag)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class _RankDir:
    """One `mp_rank_*` folder with the ranks its name and the run's degrees give it."""

    name: str
    path: str
    tp: int
    pp: int
    ep: int


def _arg(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default) if args is not None else default
    return default if value is None else value


def rule_args(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of `classify_megatron` (without tp) for a checkpoint read here (from its meta)."""
    return {k: meta.get(k) for k in ("checkpoint_version", "swiglu", "num_heads", "num_groups")}


def spec_for(ckpt: Checkpoint, name: str) -> TpSpec:
    """The TP rule of parameter `name` of a Megatron legacy checkpoint."""
    return classify_megatron(name, tp=ckpt.degrees.tp, **rule_args(ckpt.meta))


class MegatronLegacyFormat(CheckpointFormat):
    """Megatron-LM `--ckpt-format torch` checkpoints (also what Megatron-DeepSpeed's converters write)."""

    format = Format.MEGATRON

    def param_spec(self, ckpt: Checkpoint, name: str) -> TpSpec:
        return spec_for(ckpt, name)

    def claim_run(self, listing: DirListing) -> Run | None:
        root = listing.path
        tags = [d for d in listing.dirs if _ITER_RE.match(d) or d == "release"]
        tags = [t for t in tags if _is_legacy_iteration(listing.sub(t))]
        if tags:
            tracker = listing.read_text(TRACKER) if TRACKER in listing.file_set else None
            latest = None
            if tracker == "release":
                latest = "release"
            elif tracker is not None and tracker.isdigit():
                latest = f"iter_{int(tracker):07d}"
            its = tuple(IterationRef(root, os.path.join(root, t), t, _iteration_of(t), t == latest, self.format)
                        for t in sorted(tags))
            return Run(root, self.format, its, latest_tag=latest if latest in tags else None)
        if _is_legacy_iteration(listing) and TRACKER not in listing.file_set:
            tag = os.path.basename(root.rstrip(os.sep)) or root
            return Run(root, self.format, (IterationRef(root, root, tag, _iteration_of(tag), True, self.format),),
                       latest_tag=tag)
        return None

    def read(self, ref: IterationRef) -> Checkpoint:
        return _Reader(ref).read()


class _Reader:
    """Reads one iteration: rank folders, every model file's pickle (metadata only), then the parameters."""

    def __init__(self, ref: IterationRef) -> None:
        self.ref = ref
        self.warnings: list[str] = []

    # -- rank folders and degrees --------------------------------------------------------------------
    def _rank_dirs(self, args: Any, names: list[tuple[str, tuple[int, ...]]]) -> tuple[list[_RankDir], Degrees]:
        pp_arg = int(_arg(args, "pipeline_model_parallel_size", 0) or 0)
        ep_arg = int(_arg(args, "expert_model_parallel_size", 0) or 0)
        dirs: list[_RankDir] = []
        for name, nums in names:
            tp, rest = nums[0], nums[1:]
            pp = ep = 0
            if len(rest) == 2:
                pp, ep = rest
            elif len(rest) == 1:
                if pp_arg > 1 or (pp_arg == 0 and ep_arg <= 1):
                    pp = rest[0]
                    if pp_arg == 0:
                        self.warnings.append(f"{name}: args do not say whether the suffix is a pipeline or an "
                                             "expert rank; read as pipeline")
                elif ep_arg > 1:
                    ep = rest[0]
                else:
                    pp = rest[0]
                    self.warnings.append(f"{name}: args say pp=1 and ep=1 but the folder has a rank suffix; "
                                         "read as pipeline")
            dirs.append(_RankDir(name, os.path.join(self.ref.path, name), tp, pp, ep))
        tp = max(d.tp for d in dirs) + 1
        pp = max(d.pp for d in dirs) + 1
        ep = max(d.ep for d in dirs) + 1
        have = {(d.tp, d.pp, d.ep) for d in dirs}
        for t in range(tp):
            for p in range(pp):
                for e in range(ep):
                    if (t, p, e) not in have:
                        raise CheckpointError(self.ref.path, f"missing the folder of tp rank {t}, pp rank {p}, "
                                                             f"ep rank {e} ({len(dirs)} mp_rank folders found)")
        tp_arg = _arg(args, "tensor_model_parallel_size", None) or _arg(args, "model_parallel_size", None)
        for label, arg, got in (("tensor", tp_arg, tp), ("pipeline", pp_arg or None, pp),
                                ("expert", ep_arg or None, ep)):
            if arg is not None and int(arg) != got:
                self.warnings.append(f"args say {label} parallel size {arg} but the folders hold {got}")
        dp = _arg(args, "data_parallel_size", 1)
        return dirs, Degrees(tp=tp, pp=pp, dp=int(dp) if isinstance(dp, int) and dp > 0 else 1, ep=ep)

    # -- reading ---------------------------------------------------------------------------------------
    def read(self) -> Checkpoint:
        ref = self.ref
        listing = DirListing.of(ref.path)
        names = []
        for d in listing.dirs:
            m = _RANK_RE.match(d)
            if m:
                names.append((d, tuple(int(g) for g in m.groups() if g is not None)))
        if not names:
            raise CheckpointError(ref.path, "no mp_rank_* folders: not a Megatron legacy iteration")
        names.sort(key=lambda x: x[1])
        first = os.path.join(ref.path, names[0][0], MODEL_FILE)
        if not os.path.isfile(first):
            raise CheckpointError(os.path.join(ref.path, names[0][0]), f"no {MODEL_FILE}")
        head = load_torch_metadata(first).obj
        if not isinstance(head, dict):
            raise CheckpointError(first, "the pickle is not a dict")
        args = head.get("args")
        dirs, degrees = self._rank_dirs(args, names)
        states: dict[tuple[int, int, int], dict[str, Any]] = {}
        files: list[RankFile] = []
        has_distrib = False
        for d in dirs:
            if not os.path.isfile(os.path.join(d.path, MODEL_FILE)):
                raise CheckpointError(d.path, f"no {MODEL_FILE}")
        paths = [os.path.join(d.path, MODEL_FILE) for d in dirs]
        objs = _pmap(lambda p: head if p == first else load_torch_metadata(p).obj, paths)
        for d, path, obj in zip(dirs, paths, objs, strict=True):
            if not isinstance(obj, dict):
                raise CheckpointError(path, "the pickle is not a dict")
            states[(d.tp, d.pp, d.ep)] = {"path": path, "obj": obj}
            ep = d.ep if degrees.ep > 1 else None
            files.append(RankFile(path, "model_optim_rng", os.path.getsize(path), tp=d.tp, pp=d.pp, ep=ep))
            dpath = os.path.join(d.path, DISTRIB_FILE)
            if os.path.isfile(dpath):
                has_distrib = True
                files.append(RankFile(dpath, "distrib_optim", os.path.getsize(dpath), tp=d.tp, pp=d.pp, ep=ep))
        meta = self._meta(head, args)
        params = self._params(states, degrees, meta)
        dtypes = Counter(p.dtype for p in params if p.tied_to is None)
        optimizer = None
        if has_distrib:
            optimizer = "DistributedOptimizer (distrib_optim.pt: flat buffers, not mapped to parameters)"
        elif head.get("optimizer") is not None:
            optimizer = "Megatron optimizer (inside model_optim_rng.pt, not mapped to parameters)"
        iteration = ref.iteration if ref.iteration is not None else head.get("iteration")
        return Checkpoint(
            path=ref.path, run_root=ref.run_root, format=Format.MEGATRON, tag=ref.tag,
            iteration=iteration if isinstance(iteration, int) else None, latest=ref.latest, degrees=degrees,
            zero_stage=None, dtype=dtypes.most_common(1)[0][0] if dtypes else None, optimizer=optimizer,
            optimizer_states=(), files=tuple(files), params=params, meta=meta, warnings=tuple(self.warnings),
        )

    def _meta(self, head: Mapping[str, Any], args: Any) -> dict[str, Any]:
        heads = _arg(args, "num_attention_heads", None)
        groups = None
        if _arg(args, "group_query_attention", False):
            groups = _arg(args, "num_query_groups", None)
        elif _arg(args, "num_key_value_heads", None):
            groups = _arg(args, "num_key_value_heads", None)
        padded = _arg(args, "padded_vocab_size", None)
        true_vocab = None
        for key in _TRUE_VOCAB_ARGS:
            value = _arg(args, key, None)
            if isinstance(value, int) and 0 < value and (not isinstance(padded, int) or value <= padded):
                true_vocab = value
                break
        version = head.get("checkpoint_version")
        return {
            "checkpoint_version": float(version) if isinstance(version, (int, float)) else None,
            "swiglu": bool(_arg(args, "swiglu", False)),
            "num_heads": int(heads) if isinstance(heads, int) else None,
            "num_groups": int(groups) if isinstance(groups, int) else None,
            "num_layers": _arg(args, "num_layers", None),
            "decoder_first_pipeline_num_layers": _arg(args, "decoder_first_pipeline_num_layers", None),
            "decoder_last_pipeline_num_layers": _arg(args, "decoder_last_pipeline_num_layers", None),
            "untie_embeddings_and_output_weights": bool(_arg(args, "untie_embeddings_and_output_weights", False)),
            "padded_vocab_size": padded if isinstance(padded, int) else None,
            "true_vocab_size": true_vocab,
            "has_args": args is not None,
        }

    # -- parameters ----------------------------------------------------------------------------------
    def _chunks(self, obj: Mapping[str, Any], path: str) -> list[tuple[int, Mapping[str, Any]]]:
        if isinstance(obj.get("model"), Mapping):
            return [(0, obj["model"])]
        chunks = sorted((int(m.group(1)), v) for k, v in obj.items()
                        if isinstance(k, str) and (m := _CHUNK_RE.match(k)) and isinstance(v, Mapping))
        if not chunks:
            raise CheckpointError(path, "no 'model' (or 'model0'...) state dict")
        return chunks

    def _flatten(self, d: Mapping[str, Any], prefix: str = "") -> dict[str, TensorRef]:
        out: dict[str, TensorRef] = {}
        for key, value in d.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping):
                out.update(self._flatten(value, name + "."))
            elif isinstance(value, TensorRef) and not name.endswith("_extra_state"):
                out[name] = value
        return out

    def _params(self, states: dict[tuple[int, int, int], dict[str, Any]], deg: Degrees,
                meta: Mapping[str, Any]) -> tuple[Param, ...]:
        flat: dict[tuple[int, int, int], list[tuple[int, dict[str, TensorRef]]]] = {}
        for key, st in states.items():
            flat[key] = [(vp, self._flatten(sd)) for vp, sd in self._chunks(st["obj"], st["path"])]
        offsets = self._layer_offsets(flat, deg, meta)
        experts_per_rank = self._experts_per_rank(flat, deg)
        entries: dict[str, dict[tuple[int, int], TensorRef]] = {}
        order: list[str] = []
        stage_of: dict[str, int] = {}
        for (tp, pp, ep), chunks in sorted(flat.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
            for vp, tensors in chunks:
                for local, tref in tensors.items():
                    name, is_expert = self._global_name(local, offsets[(pp, vp)], ep, experts_per_rank)
                    if ep and not is_expert:
                        continue  # EP ranks replicate every non-expert parameter: keep ep rank 0's
                    if name in stage_of and stage_of[name] != pp:
                        if tp == 0:
                            self.warnings.append(f"{name}: found on pipeline stages {stage_of[name]} and {pp}; "
                                                 f"kept stage {stage_of[name]}")
                        continue
                    if name not in entries:
                        entries[name] = {}
                        order.append(name)
                        stage_of[name] = pp
                    entries[name][(tp, pp)] = tref
        return tuple(self._param(name, entries[name], deg, meta, entries) for name in order)

    def _param(self, name: str, by_rank: dict[tuple[int, int], TensorRef], deg: Degrees,
               meta: Mapping[str, Any], all_names: Mapping[str, Any]) -> Param:
        spec = classify_megatron(name, tp=deg.tp, **rule_args(meta))
        ranks = sorted(by_rank)
        pp = ranks[0][1]
        found = [by_rank.get((t, pp)) for t in range(deg.tp)]
        missing = [t for t, r in enumerate(found) if r is None]
        if missing:
            raise CheckpointError(self.ref.path, f"{name}: no tensor on tp rank(s) {missing} of pipeline stage {pp}")
        refs = [r for r in found if r is not None]
        shapes = [tuple(r.shape) for r in refs]
        self._check_shapes(name, spec, shapes, refs)
        shape = global_shape(spec, shapes)
        padded = None
        true_vocab = meta.get("true_vocab_size")
        if spec.vocab and isinstance(true_vocab, int) and shape and shape[0] > true_vocab:
            padded, shape = shape, (true_vocab, *shape[1:])
        flags = []
        if spec.rule == TpRule.UNKNOWN:
            flags.append("unknown name: default dim-0 rule")
        if len({r.dtype for r in refs}) > 1:
            flags.append("tensor-parallel ranks disagree on dtype")
        return Param(name=name, shape=shape, dtype=refs[0].dtype,
                     shards=tuple(Shard(t, pp, s) for t, s in enumerate(shapes)), partition_dim=spec.dim,
                     rule=spec.rule.value, tied_to=self._tied_to(name, meta, all_names),
                     fragments=tuple(Fragment("weight", r, 0, r.numel, 0, tp=t, pp=pp) for t, r in enumerate(refs)),
                     padded_shape=padded, flags=tuple(flags))

    def _check_shapes(self, name: str, spec: TpSpec, shapes: list[tuple[int, ...]], refs: list[TensorRef]) -> None:
        for t, s in enumerate(shapes[1:], 1):
            other = [i for i in range(len(s)) if i != spec.dim]
            if len(s) != len(shapes[0]) or any(s[i] != shapes[0][i] for i in other):
                raise CheckpointError(refs[t].file, f"{name}: shape {list(s)} on tp rank {t} does not fit "
                                                    f"{list(shapes[0])} on tp rank 0 under the {spec.label} rule")

    @staticmethod
    def _tied_to(name: str, meta: Mapping[str, Any], all_names: Mapping[str, Any]) -> str | None:
        if meta.get("untie_embeddings_and_output_weights"):
            return None
        if name.endswith("word_embeddings_for_head.weight") or name == "output_layer.weight":
            for cand in ("language_model.embedding.word_embeddings.weight", "embedding.word_embeddings.weight",
                         "word_embeddings.weight"):
                if cand in all_names:
                    return cand
        return None

    # -- renumbering ---------------------------------------------------------------------------------
    def _layer_offsets(self, flat: Mapping[tuple[int, int, int], list[tuple[int, dict[str, TensorRef]]]],
                       deg: Degrees, meta: Mapping[str, Any]) -> dict[tuple[int, int], int]:
        """Global index of each (pp stage, virtual chunk)'s local layer 0: chunks in Megatron's order."""
        counts: dict[tuple[int, int], int] = {}
        for pp in range(deg.pp):
            for vp, tensors in flat[(0, pp, 0)]:
                local = {int(m.group(1)) for n in tensors if not n.startswith("mtp.")
                         for m in [_LAYER_RE.search(n)] if m}
                counts[(pp, vp)] = max(local) + 1 if local else 0
        n_vp = max(vp for _, vp in counts) + 1
        offsets: dict[tuple[int, int], int] = {}
        running = 0
        for vp in range(n_vp):
            for pp in range(deg.pp):
                if (pp, vp) in counts:
                    offsets[(pp, vp)] = running
                    running += counts[(pp, vp)]
        total = meta.get("num_layers")
        if isinstance(total, int) and running and running != total:
            self.warnings.append(f"the stages hold {running} layers but args say num_layers={total}")
        if n_vp == 1 and deg.pp > 1:  # uneven pipelines: the folders must hold what args say
            ends = ((0, "decoder_first_pipeline_num_layers"), (deg.pp - 1, "decoder_last_pipeline_num_layers"))
            for stage, key in ends:
                want = meta.get(key)
                if isinstance(want, int) and counts.get((stage, 0)) != want:
                    self.warnings.append(f"pipeline stage {stage} holds {counts.get((stage, 0))} layers but args "
                                         f"say {key}={want}")
        return offsets

    def _experts_per_rank(self, flat: Mapping[tuple[int, int, int], list[tuple[int, dict[str, TensorRef]]]],
                          deg: Degrees) -> int:
        if deg.ep == 1:
            return 0
        seen: set[int] = set()
        for _, tensors in flat[(0, 0, 0)]:
            for n in tensors:
                m = _EXPERT_RE.search(n)
                if m and "experts" in n:
                    seen.add(int(m.group(2) if m.group(2) is not None else m.group(5)))
        return len(seen)

    @staticmethod
    def _global_name(local: str, offset: int, ep: int, per_rank: int) -> tuple[str, bool]:
        name = local
        if offset and not local.startswith("mtp."):
            name = _LAYER_RE.sub(lambda m: f"layers.{int(m.group(1)) + offset}.", local, count=1)
        is_expert = "experts." in name and "shared_experts" not in name
        if is_expert and ep and per_rank:
            def shift(m: re.Match[str]) -> str:
                if m.group(1) is not None:
                    return f"{m.group(1)}{int(m.group(2)) + ep * per_rank}{m.group(3)}"
                return f"{m.group(4)}{int(m.group(5)) + ep * per_rank}"
            name = _EXPERT_RE.sub(shift, name, count=1)
        return name, is_expert


register(MegatronLegacyFormat())
