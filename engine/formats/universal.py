"""DeepSpeed universal checkpoints (`ds_to_universal` output): a `zero/<param>/` folder of fp32 and moments each."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from math import prod
from typing import Any, TypeVar

from ..errors import CheckpointError
from ..layout import Checkpoint, Degrees, Format, Fragment, IterationRef, Param, RankFile, Run, Shard
from ..rules import TpRule, classify_deepspeed
from ..safe_unpickle import load_torch_metadata
from ..tensorref import TensorRef
from .base import CheckpointFormat, DirListing, register

STATES = ("fp32", "exp_avg", "exp_avg_sq")
LATEST = "latest_universal"
_MODEL_RE = re.compile(r"^(?:zero_pp_rank_(\d+)_)?mp_rank_(\d+)_model_states\.pt$")
_TRAILING_INT = re.compile(r"(\d+)\D*$")
_MAX_WORKERS = 16

T = TypeVar("T")
R = TypeVar("R")


def iteration_from_tag(tag: str) -> int | None:
    """`global_step3_universal` -> 3 (the last number in the tag), else None."""
    m = _TRAILING_INT.search(tag)
    return int(m.group(1)) if m else None


def is_universal_tag_dir(path: str) -> bool:
    """True when `path/zero/` holds at least one `<param>/fp32.pt` (stops at the first hit)."""
    zero = os.path.join(path, "zero")
    try:
        with os.scandir(zero) as it:
            for entry in it:
                if entry.is_dir() and os.path.isfile(os.path.join(entry.path, "fp32.pt")):
                    return True
    except OSError:
        return False
    return False


def parallel_map(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """Map over many small-file reads; a thread pool once there are enough of them to overlap I/O."""
    items = list(items)
    if len(items) < 32:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(_MAX_WORKERS, len(items))) as ex:
        return list(ex.map(fn, items))


@dataclass
class _ParamFiles:
    """What one `zero/<name>/` folder holds: the state tensors, fp32.pt's extra keys, and file sizes."""

    name: str
    refs: dict[str, TensorRef] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    bare: bool = False
    sizes: dict[str, int] = field(default_factory=dict)
    has_step: bool = False


def _state_tensor(obj: Any, path: str) -> tuple[TensorRef, dict[str, Any], bool]:
    if isinstance(obj, TensorRef):
        return obj, {}, True
    if isinstance(obj, dict) and isinstance(obj.get("param"), TensorRef):
        return obj["param"], {k: v for k, v in obj.items() if k != "param"}, False
    raise CheckpointError(path, "expected a tensor or a dict with a 'param' tensor")


def _read_param_dir(zero_dir: str, name: str) -> _ParamFiles:
    pdir = os.path.join(zero_dir, name)
    out = _ParamFiles(name)
    try:
        with os.scandir(pdir) as it:
            entries = {e.name: e for e in it if e.is_file()}
    except OSError as exc:
        raise CheckpointError(pdir, f"cannot list ({exc.strerror})") from None
    if "fp32.pt" not in entries:
        raise CheckpointError(pdir, "no fp32.pt in this universal parameter folder")
    for state in STATES:
        entry = entries.get(f"{state}.pt")
        if entry is None:
            continue
        loaded = load_torch_metadata(entry.path)
        ref, extras, bare = _state_tensor(loaded.obj, entry.path)
        out.refs[state] = ref
        out.sizes[entry.path] = loaded.zip_dir.file_size if loaded.zip_dir is not None else entry.stat().st_size
        if state == "fp32":
            out.extras, out.bare = extras, bare
    step = entries.get("step.pt")
    if step is not None:
        out.has_step = True
        out.sizes[step.path] = step.stat().st_size
    return out


def _load_dict(path: str) -> dict[str, Any]:
    obj = load_torch_metadata(path).obj
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"expected a dict at the top level, found {type(obj).__name__}")
    return obj


def _flat_shapes(param_shapes: Any) -> dict[str, tuple[int, ...]]:
    """`param_shapes` (a list of per-group dicts, or one dict) flattened to name -> shape."""
    groups = param_shapes if isinstance(param_shapes, (list, tuple)) else [param_shapes]
    out: dict[str, tuple[int, ...]] = {}
    for group in groups:
        if isinstance(group, Mapping):
            for name, shape in group.items():
                if isinstance(shape, (list, tuple)):
                    out[str(name)] = tuple(int(s) for s in shape)
    return out


def _int(value: Any) -> int | None:
    try:
        return int(value) if value is not None and not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


def _model_dtype(ds_config: Any) -> str:
    if isinstance(ds_config, Mapping):
        for key, dtype in (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16")):
            section = ds_config.get(key)
            if isinstance(section, Mapping) and section.get("enabled"):
                return dtype
    return "float32"


def _config_stage(ds_config: Any) -> int | None:
    if isinstance(ds_config, Mapping):
        zero = ds_config.get("zero_optimization")
        if isinstance(zero, Mapping):
            return _int(zero.get("stage"))
    return None


def _infer_tp(params: Mapping[str, _ParamFiles], local: Mapping[str, tuple[int, ...]]) -> int | None:
    """TP degree from a partitioned param's global (cat_dim) size over its local size in the copied model states."""
    best = None
    for name, pf in params.items():
        cat = _int(pf.extras.get("cat_dim"))
        shape = local.get(name)
        if cat is None or shape is None or pf.extras.get("vocab_tensor") or pf.extras.get("param_n_sub_params"):
            continue
        full = pf.refs["fp32"].shape
        if cat < len(full) and cat < len(shape) and shape[cat] and full[cat] % shape[cat] == 0:
            best = max(best or 1, full[cat] // shape[cat])
    return best


def _split_dim(shape: tuple[int, ...], shards: Iterable[Shard]) -> int | None:
    """The one dim along which the recorded TP-local shapes are smaller than the global shape (AutoTP params)."""
    dims = {d for sh in shards if len(sh.shape) == len(shape)
            for d, (a, b) in enumerate(zip(sh.shape, shape)) if a != b}
    return dims.pop() if len(dims) == 1 and len(shape) <= 2 else None


def _rule_for(name: str, extras: Mapping[str, Any], uc_info: Any, tp: int) -> tuple[str, int | None, list[str]]:
    spec = classify_deepspeed(name, uc_info if isinstance(uc_info, Mapping) else None, tp)
    rule, dim, flags = spec.rule, spec.dim, []
    cat = _int(extras.get("cat_dim"))
    if extras.get("sub_param_shape") is not None:
        rule = TpRule.SUBPARAMS
    elif (_int(extras.get("param_n_sub_params")) or 0) > 1:
        rule = TpRule.SWIGLU
    elif cat is not None and rule in (TpRule.COLUMN, TpRule.ROW, TpRule.UNKNOWN):
        rule = TpRule.COLUMN if cat == 0 else TpRule.ROW
    if cat is not None and rule not in (TpRule.REPLICATED, TpRule.AVERAGE):
        dim = cat
    if rule == TpRule.UNKNOWN:
        flags.append("unknown name: default dim-0 rule")
    return rule.value, dim, flags


class UniversalFormat(CheckpointFormat):
    """`latest_universal` + `<tag>_universal/zero/<param>/{fp32,exp_avg,exp_avg_sq}.pt`, or a tag folder alone."""

    format = Format.UNIVERSAL

    def claim_run(self, listing: DirListing) -> Run | None:
        root = listing.path
        # A DeepSpeed root that also holds a universal copy stays the DeepSpeed reader's (one run of all its
        # global_stepN dirs); each `<tag>_universal/` inside is then claimed below as a tag folder of its own.
        if LATEST in listing.file_set and "latest" not in listing.file_set:
            named = os.path.basename((listing.read_text(LATEST) or "").strip().rstrip("/"))
            tags = [d for d in listing.dirs if (d == named or d.endswith("_universal"))
                    and is_universal_tag_dir(os.path.join(root, d))]
            if tags:
                its = tuple(IterationRef(root, os.path.join(root, t), t, iteration_from_tag(t), t == named,
                                         self.format) for t in tags)
                return Run(root, self.format, its, latest_tag=named if named in tags else None)
        if "zero" in listing.dirs and is_universal_tag_dir(root):
            tag = os.path.basename(root.rstrip(os.sep)) or root
            ref = IterationRef(root, root, tag, iteration_from_tag(tag), True, self.format)
            return Run(root, self.format, (ref,), latest_tag=tag)
        return None

    def read(self, ref: IterationRef) -> Checkpoint:
        tag_dir = ref.path
        zero_dir = os.path.join(tag_dir, "zero")
        names = DirListing.of(zero_dir).dirs
        if not names:
            raise CheckpointError(zero_dir, "no zero/<param>/ folders: not a universal checkpoint")
        model_files: dict[int, list[tuple[int, str]]] = {}
        for fname in DirListing.of(tag_dir).files:
            m = _MODEL_RE.match(fname)
            if m:
                model_files.setdefault(int(m.group(2)), []).append((int(m.group(1) or 0), fname))
        firsts = {mp: min(files)[1] for mp, files in model_files.items()}  # lowest dp rank per mp rank
        opt_path = os.path.join(zero_dir, "optimizer_state.pt")
        has_opt = os.path.isfile(opt_path)
        model_paths = [os.path.join(tag_dir, f) for f in firsts.values()]

        jobs: list[tuple[str, str]] = [("param", n) for n in names]
        jobs += [("model", p) for p in model_paths]
        if has_opt:
            jobs.append(("opt", opt_path))

        def run_job(job: tuple[str, str]) -> Any:
            kind, arg = job
            return _read_param_dir(zero_dir, arg) if kind == "param" else _load_dict(arg)

        results = parallel_map(run_job, jobs)
        params_files = {r.name: r for r in results[: len(names)]}
        models = dict(zip(model_paths, results[len(names) : len(names) + len(model_paths)]))
        opt = results[-1] if has_opt else None
        return self._build(ref, params_files, model_files, firsts, models, opt, opt_path)

    def _build(self, ref: IterationRef, pfs: dict[str, _ParamFiles], model_files: dict[int, list[tuple[int, str]]],
               firsts: dict[int, str], models: dict[str, dict[str, Any]], opt: dict[str, Any] | None,
               opt_path: str) -> Checkpoint:
        tag_dir = ref.path
        warnings: list[str] = []
        first = models[os.path.join(tag_dir, firsts[min(firsts)])] if firsts else {}
        if not firsts:
            warnings.append("no copied model-states file: degrees, iteration and shapes of flat tensors are guessed")

        # degrees
        mp_count = len(firsts) or 1
        dims = first.get("checkpoint_parallel_dimensions")
        args = first.get("args")
        tp = pp = None
        if isinstance(dims, Mapping):
            tp, pp = _int(dims.get("tp_degree")), _int(dims.get("pp_degree"))
        elif args is not None and _int(getattr(args, "tensor_model_parallel_size", None)):
            tp = _int(getattr(args, "tensor_model_parallel_size", None))
            pp = _int(getattr(args, "pipeline_model_parallel_size", None)) or 1
        mp_world = _int(first.get("mp_world_size")) or mp_count
        if tp is None:
            local0 = _flat_shapes(first.get("param_shapes"))
            if first.get("module") is None and firsts:  # pipeline engine: mp = pp * tp
                tp = _infer_tp(pfs, local0) or 1
                pp = max(1, mp_world // tp)
            else:
                tp, pp = mp_world, 1
        tp, pp = max(1, tp), max(1, pp or 1)
        dp = _int(first.get("dp_world_size")) or 1

        # local shapes per (tp, pp) and the shapes of flat (ZeRO-3) tensors
        shards: dict[str, list[Shard]] = {}
        all_shapes: dict[str, tuple[int, ...]] = {}
        shared: dict[str, str] = {}
        frozen: set[str] = set()
        for mp, fname in sorted(firsts.items()):
            obj = models[os.path.join(tag_dir, fname)]
            shapes = _flat_shapes(obj.get("param_shapes"))
            for name, shape in _flat_shapes(obj.get("frozen_param_shapes")).items():
                shapes.setdefault(name, shape)
            for name, shape in shapes.items():
                shards.setdefault(name, []).append(Shard(mp % tp, mp // tp, shape))
                all_shapes.setdefault(name, shape)
            if isinstance(obj.get("shared_params"), Mapping):
                shared.update({str(k): str(v) for k, v in obj["shared_params"].items()})
            if isinstance(obj.get("frozen_param_shapes"), Mapping):
                frozen.update(str(k) for k in obj["frozen_param_shapes"])

        uc_info = first.get("universal_checkpoint_info")
        padded_vocab = _int(uc_info.get("padded_vocab_size")) if isinstance(uc_info, Mapping) else None
        params: list[Param] = []
        for name in sorted(pfs):
            pf = pfs[name]
            fp32 = pf.refs["fp32"]
            flags: list[str] = []
            shape = fp32.shape
            if pf.bare:
                true = all_shapes.get(name)
                if true is not None and prod(true) == fp32.numel:
                    shape = true
                else:
                    flags.append("flat tensor: true shape unknown")
                    warnings.append(f"{name}: fp32.pt is a flat tensor and no model-states file gives its shape")
            frags = []
            for state, sref in pf.refs.items():
                if sref.numel != fp32.numel:
                    warnings.append(f"{name}: {state}.pt holds {sref.numel} elements, fp32.pt {fp32.numel}")
                    continue
                frags.append(Fragment(state, sref, 0, sref.numel, 0))
            rule, dim, rflags = _rule_for(name, pf.extras, uc_info, tp)
            if rule == TpRule.UNKNOWN.value and (split := _split_dim(shape, shards.get(name, ()))) is not None:
                rule, dim = (TpRule.COLUMN if split == 0 else TpRule.ROW).value, split
                rflags = ["partition dim read from the recorded local shapes"]
            padded = None
            if pf.extras.get("vocab_tensor") and padded_vocab and shape and padded_vocab > shape[0]:
                padded = (padded_vocab, *shape[1:])
            params.append(Param(
                name=name, shape=tuple(shape), dtype="float32", shards=tuple(shards.get(name, ())),
                partition_dim=dim, rule=rule, frozen=name in frozen, tied_to=shared.get(name),
                fragments=tuple(frags), padded_shape=padded, flags=tuple(flags + rflags),
            ))

        # files
        files: list[RankFile] = []
        for mp, entries in sorted(model_files.items()):
            for dp_rank, fname in sorted(entries):
                path = os.path.join(tag_dir, fname)
                files.append(RankFile(path, "model_states", _size(path), tp=mp % tp, pp=mp // tp,
                                      dp=dp_rank if fname.startswith("zero_pp_rank_") else None))
        if opt is not None:
            files.append(RankFile(opt_path, "optim_states", _size(opt_path)))
        for name in sorted(pfs):
            for path, size in sorted(pfs[name].sizes.items()):
                files.append(RankFile(path, "universal", size))

        # optimizer and iteration
        ds_config = first.get("ds_config")
        stage_obj = opt.get("zero_stage") if opt is not None else None
        stage = _int(stage_obj) if stage_obj is not None else None
        if stage is None:
            stage = _config_stage(ds_config)
            if stage is None and any(f.startswith("zero_pp_rank_") for f in firsts.values()):
                stage = 3
        if opt is not None and stage_obj is None:
            optimizer = "BF16_Optimizer"
        elif stage == 3:
            optimizer = "ZeRO-3 (DeepSpeedZeroOptimizer_Stage3)"
        elif stage is not None:
            optimizer = f"ZeRO-{stage} (DeepSpeedZeroOptimizer)"
        else:
            optimizer = None
        present = {s for pf in pfs.values() for s in pf.refs}
        opt_states = tuple(s for s in STATES if s in present)
        if any(pf.has_step for pf in pfs.values()):
            opt_states += ("step",)
        iteration = _int(first.get("global_steps"))
        if iteration is None:
            iteration = _int(first.get("iteration"))
        if iteration is None:
            iteration = ref.iteration

        meta = {
            "universal_checkpoint_info": uc_info,
            "ds_version": first.get("ds_version"),
            "shared_params": shared,
            "frozen_params": sorted(frozen),
            "mp_world_size": mp_world,
        }
        return Checkpoint(
            path=tag_dir, run_root=ref.run_root, format=self.format, tag=ref.tag, iteration=iteration,
            latest=ref.latest, degrees=Degrees(tp=tp, pp=pp, dp=dp), zero_stage=stage,
            dtype=_model_dtype(ds_config), optimizer=optimizer, optimizer_states=opt_states,
            files=tuple(files), params=tuple(params), meta=meta, warnings=tuple(warnings),
        )


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


register(UniversalFormat())
