"""DeepSpeed checkpoints (ZeRO 0/1/2/3, BF16_Optimizer, pipeline, AutoTP, Megatron-DeepSpeed) read from metadata."""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import CheckpointError
from ..layout import Checkpoint, Degrees, Format, Fragment, IterationRef, Param, RankFile, Run, Shard
from ..rules import TpRule, TpSpec, classify_deepspeed, global_shape
from ..safe_unpickle import LoadedPickle, load_torch_metadata
from ..standins import StandIn
from ..tensorref import TensorRef
from .base import CheckpointFormat, DirListing, register

OPTIM_RE = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_?optim_states\.pt$")
Z3_MODEL_RE = re.compile(r"^(bf16_|fp16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
MP_MODEL_RE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
LAYER_TP_RE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
LAYER_RE = re.compile(r"^layer_(\d+)-model_states\.pt$")
EXPERT_RE = re.compile(r"^(?:layer_(\d+)_)?expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
EXPP_RE = re.compile(r"^expp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
STEP_TAG_RE = re.compile(r"(\d+)$")

DTYPE_BY_CONFIG = (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16"))
MOMENTS = ("exp_avg", "exp_avg_sq")


def is_tag_dir(listing: DirListing) -> bool:
    """A DeepSpeed tag directory holds model-state files (universal outputs hold `zero/` too: not ours)."""
    if "zero" in listing.dirs and "optimizer_state.pt" in listing.sub("zero").file_set:
        return False
    return any(MP_MODEL_RE.match(f) or Z3_MODEL_RE.match(f) for f in listing.files)


def _iteration_of(tag: str) -> int | None:
    m = STEP_TAG_RE.search(tag)
    return int(m.group(1)) if m else None


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(key, default)
    if isinstance(obj, StandIn):
        return obj.__dict__.get(key, default)
    return default


@dataclass
class _TagFiles:
    """The rank files of one tag directory, parsed from their names."""

    mp_models: dict[int, str] = field(default_factory=dict)  # mp index -> path
    z3_models: dict[tuple[int, int], str] = field(default_factory=dict)  # (dp, mp) -> path
    optims: dict[tuple[int, int], str] = field(default_factory=dict)  # (dp, mp) -> path
    layers: dict[tuple[int, int], str] = field(default_factory=dict)  # (layer, tp) -> path
    experts: list[str] = field(default_factory=list)
    expp: list[str] = field(default_factory=list)
    bf16_prefix: bool = False

    @classmethod
    def scan(cls, path: str) -> _TagFiles:
        tf = cls()
        for name in DirListing.of(path).files:
            full = os.path.join(path, name)
            if m := MP_MODEL_RE.match(name):
                tf.mp_models[int(m.group(1))] = full
            elif m := Z3_MODEL_RE.match(name):
                tf.z3_models[(int(m.group(2)), int(m.group(3)))] = full
            elif m := OPTIM_RE.match(name):
                tf.optims[(int(m.group(2)), int(m.group(3)))] = full
                tf.bf16_prefix |= m.group(1) == "bf16_"
            elif m := LAYER_TP_RE.match(name):
                tf.layers[(int(m.group(1)), int(m.group(2)))] = full
            elif m := LAYER_RE.match(name):
                tf.layers[(int(m.group(1)), 0)] = full
            elif EXPERT_RE.match(name):
                tf.experts.append(full)
            elif EXPP_RE.match(name):
                tf.expp.append(full)
        return tf


class _Builder:
    """Accumulates parameters of one checkpoint: local shapes per (pp, tp) and fragments."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.local: dict[str, dict[tuple[int, int], tuple[int, ...]]] = {}
        self.frags: dict[str, list[Fragment]] = {}
        self.frozen: set[str] = set()
        self.alias_weights: dict[str, list[Fragment]] = {}

    def shape(self, name: str, pp: int, tp: int, shape: Any) -> None:
        if name not in self.local:
            self.order.append(name)
            self.local[name] = {}
            self.frags[name] = []
        self.local[name].setdefault((pp, tp), tuple(int(s) for s in shape))

    def add(self, name: str, frag: Fragment) -> None:
        self.frags[name].append(frag)


class DeepSpeedFormat(CheckpointFormat):
    """DeepSpeed `engine.save_checkpoint` trees: a root with `latest` and tag directories."""

    format = Format.DEEPSPEED

    def claim_run(self, listing: DirListing) -> Run | None:
        latest = listing.read_text("latest") if "latest" in listing.file_set else None
        tags = [d for d in listing.dirs if not d.endswith("_universal") and is_tag_dir(listing.sub(d))]
        if tags:
            refs = tuple(
                IterationRef(listing.path, os.path.join(listing.path, t), t, _iteration_of(t), t == latest,
                             Format.DEEPSPEED)
                for t in sorted(tags, key=lambda t: (_iteration_of(t) or -1, t))
            )
            return Run(listing.path, Format.DEEPSPEED, refs, latest)
        if is_tag_dir(listing):
            parent = os.path.dirname(listing.path)
            tag = os.path.basename(listing.path)
            parent_latest = DirListing(parent, (), ()).read_text("latest")
            ref = IterationRef(listing.path, listing.path, tag, _iteration_of(tag), parent_latest == tag,
                               Format.DEEPSPEED)
            return Run(listing.path, Format.DEEPSPEED, (ref,), parent_latest)
        return None

    def read(self, ref: IterationRef) -> Checkpoint:
        return _DeepSpeedReader(ref).read()

    def param_spec(self, ckpt: Checkpoint, name: str) -> TpSpec:
        return param_spec(ckpt, name)


class _DeepSpeedReader:
    def __init__(self, ref: IterationRef) -> None:
        self.ref = ref
        self.files = _TagFiles.scan(ref.path)
        self.warnings: list[str] = []
        self.unknown_globals: set[str] = set()
        self.bytes_read = 0
        self.models: dict[str, LoadedPickle] = {}
        self.layer_objs: dict[str, LoadedPickle] = {}
        self._stages_cache: dict[int, int] | None = None

    def _load_many(self, paths: list[str]) -> dict[str, LoadedPickle]:
        if not paths:
            return {}
        workers = min(4, len(paths))  # unpickling holds the GIL: threads only overlap the I/O
        if workers <= 2:
            loaded = [load_torch_metadata(p) for p in paths]
        else:
            with ThreadPoolExecutor(workers) as pool:
                loaded = list(pool.map(load_torch_metadata, paths))
        out = {}
        for p, lp in zip(paths, loaded):
            self.bytes_read += lp.bytes_read
            self.unknown_globals |= lp.report.unknown_globals
            out[p] = lp
        return out

    # -- top level -------------------------------------------------------------------------------
    def read(self) -> Checkpoint:
        tf = self.files
        zero3 = bool(tf.z3_models) and not tf.mp_models
        model_paths = sorted(tf.z3_models.values()) if zero3 else [tf.mp_models[k] for k in sorted(tf.mp_models)]
        if not model_paths:
            raise CheckpointError(self.ref.path, "no mp_rank_*_model_states.pt or zero_pp_rank_*_model_states.pt")
        models = self._load_many(model_paths)
        optims = self._load_many([tf.optims[k] for k in sorted(tf.optims)])
        m0 = models[model_paths[0]].obj
        if not isinstance(m0, dict):
            raise CheckpointError(model_paths[0], "model states are not a dict")
        uc_info = m0.get("universal_checkpoint_info") or {}
        args = m0.get("args")
        tp, pp, dp = self._degrees(m0, zero3, args)
        if tp * pp <= 0:
            raise CheckpointError(model_paths[0], f"bad parallel degrees tp={tp} pp={pp}")
        osd0 = _get(optims[next(iter(optims))].obj, "optimizer_state_dict") if optims else None
        zero_stage, optimizer = self._stage(osd0, zero3)
        dtype = self._dtype(m0, tf)
        builder = _Builder()
        step_values: dict[str, Any] = {}
        self.models = models
        self.layer_objs = self._load_many(sorted(tf.layers.values())) if tf.layers else {}  # read once, used twice
        if zero3:
            self._read_zero3(models, optims, tp, dp, builder)
        elif zero_stage == 0:
            self._read_zero0(models, tp, pp, builder)
        else:
            self._read_zero12(models, optims, tp, pp, dp, builder, step_values)
        self._add_module_weights(models, self.layer_objs, tp, pp, builder, zero3)
        shared = {}
        for lp in models.values():
            shared.update({k: v for k, v in (lp.obj.get("shared_params") or {}).items()})
        params = self._params(builder, uc_info, tp, shared, dtype, megatron_hints(args, m0.get("checkpoint_version")))
        files = self._rank_files(tp, pp)
        states = ["fp32", *MOMENTS] if optims or zero_stage == 0 else []
        if any(f.state == "step" for p in params for f in p.fragments) or step_values:
            states.append("step")
        present = {f.state for p in params for f in p.fragments}
        states = [s for s in states if s in present or s == "step"]
        if tf.experts:
            self.warnings.append(f"{len(tf.experts)} MoE expert files found: expert weights are listed, not merged")
        if self.unknown_globals:
            names = ", ".join(sorted(self.unknown_globals))
            self.warnings.append(f"pickles name unknown globals (kept inert): {names}")
        iteration = m0.get("iteration", m0.get("global_steps", self.ref.iteration))
        meta = {
            "ds_version": m0.get("ds_version"),
            "universal_checkpoint_info": uc_info,
            "checkpoint_version": m0.get("checkpoint_version"),
            "mp_world_size": m0.get("mp_world_size"),
            "dp_world_size": m0.get("dp_world_size"),
            "global_steps": m0.get("global_steps"),
            "args": args,
            "int_steps": step_values,
            "shared_params": shared,
            "model_files": tuple(model_paths),
            "optim_files": tuple(tf.optims[k] for k in sorted(tf.optims)),
            "bytes_read": self.bytes_read,
            "unknown_globals": tuple(sorted(self.unknown_globals)),
            "original_vocab_size": uc_info.get("original_vocab_size"),
            "padded_vocab_size": uc_info.get("padded_vocab_size"),
        }
        return Checkpoint(
            path=self.ref.path, run_root=self.ref.run_root, format=Format.DEEPSPEED, tag=self.ref.tag,
            iteration=iteration if isinstance(iteration, int) else self.ref.iteration, latest=self.ref.latest,
            degrees=Degrees(tp=tp, pp=pp, dp=dp), zero_stage=zero_stage, dtype=dtype, optimizer=optimizer,
            optimizer_states=tuple(states), files=files, params=params, meta=meta, warnings=tuple(self.warnings),
        )

    def _degrees(self, m0: dict, zero3: bool, args: Any) -> tuple[int, int, int]:
        tf = self.files
        cpd = m0.get("checkpoint_parallel_dimensions") or {}
        mp_world = int(m0.get("mp_world_size") or 1)
        tp = cpd.get("tp_degree")
        pp = cpd.get("pp_degree")
        if tp is None:
            layer_tps = {t for (_, t) in tf.layers}
            if tf.layers:
                tp = max(len(layer_tps), 1)
            elif args is not None and getattr(args, "tensor_model_parallel_size", None):
                tp = int(args.tensor_model_parallel_size)
            elif zero3:
                tp = len({m for (_, m) in tf.z3_models})
            else:
                tp = max(len(tf.mp_models), 1)
        if pp is None:
            pp = max(mp_world // tp, 1) if tf.layers else 1
        recorded = int(m0.get("dp_world_size") or 1)
        if zero3:
            dp = max(d for (d, _) in tf.z3_models) + 1
        elif tf.optims:
            dp = max(d for (d, _) in tf.optims) + 1
        else:
            dp = recorded
        dp = max(dp, recorded)  # a missing last rank must show up as missing, not as a smaller dp
        return int(tp), int(pp), int(dp)

    def _stage(self, osd0: Any, zero3: bool) -> tuple[int, str]:
        if zero3:
            return 3, "DeepSpeedZeroOptimizer_Stage3 (ZeRO-3)"
        if osd0 is None:
            return 0, "no ZeRO (optimizer inside the model states)"
        stage = _get(osd0, "zero_stage")
        if stage is None:
            return 1, "BF16_Optimizer (ZeRO-1 layout, fp32 gradient accumulation)"
        value = int(stage)
        return value, f"DeepSpeedZeroOptimizer (ZeRO-{value})"

    def _dtype(self, m0: dict, tf: _TagFiles) -> str:
        cfg = m0.get("ds_config") or {}
        for key, name in DTYPE_BY_CONFIG:
            section = cfg.get(key)
            if isinstance(section, dict) and section.get("enabled"):
                return name
        if tf.bf16_prefix:
            return "bfloat16"
        module = m0.get("module")
        if isinstance(module, dict):
            for v in module.values():
                if isinstance(v, TensorRef):
                    return v.dtype
        return "float32"

    # -- ZeRO-1/2 and BF16_Optimizer ----------------------------------------------------------
    def _read_zero12(self, models: dict[str, LoadedPickle], optims: dict[str, LoadedPickle], tp: int, pp: int,
                     dp: int, b: _Builder, step_values: dict[str, Any]) -> None:
        tf = self.files
        for mp, mpath in sorted(tf.mp_models.items()):
            stage, trank = divmod(mp, tp)
            m = models[mpath].obj
            groups = m.get("param_shapes") or []
            if not isinstance(groups, list):
                raise CheckpointError(mpath, "param_shapes is not a list of groups")
            for g in groups:
                for name, shape in g.items():
                    b.shape(name, stage, trank, shape)
            offsets: dict[str, int] = {}
            for d in range(dp):
                opath = tf.optims.get((d, mp))
                if opath is None:
                    raise CheckpointError(self.ref.path, f"optimizer file for dp rank {d}, mp rank {mp} is missing")
                osd = _get(optims[opath].obj, "optimizer_state_dict")
                if osd is None:
                    raise CheckpointError(opath, "no optimizer_state_dict")
                fp32_groups = _get(osd, "single_partition_of_fp32_groups") or []
                mappings = _get(osd, "param_slice_mappings") or []
                base = _get(osd, "base_optimizer_state") or {}
                state = base.get("state", {}) if isinstance(base, dict) else {}
                for g, mapping in enumerate(mappings):
                    flat = fp32_groups[g] if g < len(fp32_groups) else None
                    gstate = (base[g] if isinstance(base, list) else state.get(g, {})) or {}
                    srcs = {"fp32": flat, **{k: gstate.get(k) for k in MOMENTS}}
                    step = gstate.get("step")
                    for name, addr in mapping.items():
                        numel, start = int(addr.numel), int(addr.start)
                        if name not in b.local:
                            raise CheckpointError(opath, f"param_slice_mappings names {name!r}, not in param_shapes")
                        dst = offsets.get(name, 0)
                        offsets[name] = dst + numel
                        for sname, src in srcs.items():
                            if isinstance(src, TensorRef):
                                if start + numel > src.numel:
                                    raise CheckpointError(
                                        opath, f"fragment of {name} [{start}, {start + numel}) exceeds the "
                                        f"{src.numel}-element {sname} partition of group {g}")
                                b.add(name, Fragment(sname, src, start, numel, dst, trank, stage, d))
                        if dst == 0:
                            if isinstance(step, TensorRef):
                                b.add(name, Fragment("step", step, 0, 1, 0, trank, stage, 0))
                            elif step is not None:
                                step_values.setdefault(name, step)
            self._frozen_zero12(m, mpath, stage, trank, b)

    def _frozen_zero12(self, m: dict, mpath: str, stage: int, trank: int, b: _Builder) -> None:
        shapes = m.get("frozen_param_shapes") or {}
        frags = m.get("frozen_param_fragments") or {}
        for name, shape in shapes.items():
            b.shape(name, stage, trank, shape)
            b.frozen.add(name)
            t = frags.get(name)
            if isinstance(t, TensorRef):
                b.add(name, Fragment("weight", t, 0, t.numel, 0, trank, stage, 0))

    # -- ZeRO-3 -------------------------------------------------------------------------------
    def _read_zero3(self, models: dict[str, LoadedPickle], optims: dict[str, LoadedPickle], tp: int, dp: int,
                    b: _Builder) -> None:
        tf = self.files
        for trank in range(tp):
            m_paths = [tf.z3_models.get((d, trank)) for d in range(dp)]
            if any(p is None for p in m_paths):
                missing = [d for d, p in enumerate(m_paths) if p is None]
                raise CheckpointError(self.ref.path, f"ZeRO-3 model states missing for dp ranks {missing}, tp {trank}")
            m = models[m_paths[0]].obj
            groups = m.get("param_shapes") or []
            for g in groups:
                for name, shape in g.items():
                    b.shape(name, 0, trank, shape)
            for d in range(dp):
                opath = tf.optims.get((d, trank))
                if opath is None:
                    raise CheckpointError(self.ref.path, f"optimizer file for dp rank {d}, mp rank {trank} is missing")
                osd = _get(optims[opath].obj, "optimizer_state_dict")
                flats = _get(osd, "fp32_flat_groups") or []
                inner = _get(osd, "optimizer_state_dict") or {}
                state = inner.get("state", {}) if isinstance(inner, dict) else {}
                if len(flats) != len(groups):
                    raise CheckpointError(opath, f"{len(flats)} fp32 sub-groups but param_shapes has {len(groups)}")
                for g, shapes in enumerate(groups):
                    gstate = state.get(g, {}) or {}
                    srcs = {"fp32": flats[g], **{k: gstate.get(k) for k in MOMENTS}}
                    step = gstate.get("step")
                    offset = 0
                    for name, shape in shapes.items():
                        numel = _prod(shape)
                        s = -(-numel // dp)
                        real = max(0, min(s, numel - d * s))
                        if real:
                            for sname, src in srcs.items():
                                if isinstance(src, TensorRef):
                                    if offset + real > src.numel:
                                        raise CheckpointError(
                                            opath, f"ZeRO-3 piece of {name} [{offset}, {offset + real}) exceeds the "
                                            f"{src.numel}-element {sname} sub-group {g}")
                                    b.add(name, Fragment(sname, src, offset, real, d * s, trank, 0, d))
                        if d == 0 and isinstance(step, TensorRef):
                            b.add(name, Fragment("step", step, 0, 1, 0, trank, 0, 0))
                        offset += s
                    if isinstance(flats[g], TensorRef) and offset != flats[g].numel:
                        raise CheckpointError(
                            opath, f"sub-group {g} holds {flats[g].numel} elements but its parameters need {offset}")
            # frozen parameters: every dp rank holds a ceil(numel/dp) piece
            shapes = m.get("frozen_param_shapes") or {}
            for name, shape in shapes.items():
                b.shape(name, 0, trank, shape)
                b.frozen.add(name)
                numel = _prod(shape)
                s = -(-numel // dp)
                for d, mpth in enumerate(m_paths):
                    t = (models[mpth].obj.get("frozen_param_fragments") or {}).get(name)
                    real = max(0, min(s, numel - d * s))
                    if isinstance(t, TensorRef) and real:
                        b.add(name, Fragment("weight", t, 0, min(real, t.numel), d * s, trank, 0, d))

    # -- ZeRO-0 (no ZeRO optimizer files) -------------------------------------------------------
    def _read_zero0(self, models: dict[str, LoadedPickle], tp: int, pp: int, b: _Builder) -> None:
        tf = self.files
        for mp, mpath in sorted(tf.mp_models.items()):
            stage, trank = divmod(mp, tp)
            m = models[mpath].obj
            names, shapes_by_name = self._stage_param_names(m, stage, trank)
            for name in names:
                b.shape(name, stage, trank, shapes_by_name[name])
            opt = m.get("optimizer")
            if not isinstance(opt, dict):
                continue
            if "fp32_groups" in opt or "fp32_groups_flat" in opt:
                inner = opt.get("optimizer_state_dict") or {}
                masters = [t for grp in (opt.get("fp32_groups") or []) for t in grp]
            else:
                inner, masters = opt, []
            state = inner.get("state", {}) if isinstance(inner, dict) else {}
            order = [i for grp in inner.get("param_groups", []) for i in grp.get("params", [])] or sorted(state)
            for pos, key in enumerate(order):
                if pos >= len(names):
                    break
                name = names[pos]
                st = state.get(key, {}) or {}
                for sname in MOMENTS:
                    t = st.get(sname)
                    if isinstance(t, TensorRef):
                        b.add(name, Fragment(sname, t, 0, t.numel, 0, trank, stage, 0))
                if isinstance(st.get("step"), TensorRef):
                    b.add(name, Fragment("step", st["step"], 0, 1, 0, trank, stage, 0))
                if pos < len(masters) and isinstance(masters[pos], TensorRef):
                    t = masters[pos]
                    b.add(name, Fragment("fp32", t, 0, t.numel, 0, trank, stage, 0))

    def _stage_param_names(self, m: dict, stage: int, trank: int) -> tuple[list[str], dict[str, tuple]]:
        """Trainable parameter names of one stage in optimizer order (ZeRO-0 has no param_shapes)."""
        if m.get("param_shapes"):  # e.g. a weights-only reshard output: the names DeepSpeed recorded
            recorded: dict[str, tuple] = OrderedDict()
            for group in m["param_shapes"]:
                recorded.update({k: tuple(v) for k, v in group.items()})
            return list(recorded), recorded
        buffers = set(m.get("buffer_names") or [])
        module = m.get("module")
        shapes: dict[str, tuple] = OrderedDict()
        if isinstance(module, dict):
            for k, v in module.items():
                if k not in buffers and isinstance(v, TensorRef):
                    shapes[k] = v.shape
        else:
            for (layer, t), path in sorted(self.files.layers.items()):
                if t != trank or not self._layer_on_stage(layer, stage):
                    continue
                obj = self.layer_objs[path].obj
                for k, v in (obj or {}).items():
                    if isinstance(v, TensorRef):
                        shapes[f"{layer}.{k}"] = v.shape
        return list(shapes), shapes

    def _layer_on_stage(self, layer: int, stage: int) -> bool:
        stages = self._layer_stages()
        return stages.get(layer, 0) == stage

    def _layer_stages(self) -> dict[int, int]:
        """Pipeline stage of each layer file, from the ZeRO-0 optimizer sizes when nothing else records it."""
        if self._stages_cache is not None:
            return self._stages_cache
        layers = sorted({layer for (layer, _) in self.files.layers})
        n_stages = max(len(self.files.mp_models) // max(len({t for (_, t) in self.files.layers}), 1), 1)
        stages: dict[int, int] = {}
        counts = []
        for mp in sorted(self.files.mp_models):
            m = self.models[self.files.mp_models[mp]].obj
            opt = m.get("optimizer") or {}
            inner = opt.get("optimizer_state_dict", opt) if isinstance(opt, dict) else {}
            counts.append(sum(len(g.get("params", [])) for g in inner.get("param_groups", [])))
        per_layer = []
        for layer in layers:
            path = self.files.layers[(layer, 0)] if (layer, 0) in self.files.layers else None
            obj = self.layer_objs[path].obj if path else {}
            per_layer.append(sum(1 for v in (obj or {}).values() if isinstance(v, TensorRef)))
        stage, acc = 0, 0
        for layer, n in zip(layers, per_layer):
            while stage < len(counts) - 1 and acc >= counts[stage] and n > 0:
                stage, acc = stage + 1, 0
            stages[layer] = min(stage, n_stages - 1)
            acc += n
        self._stages_cache = stages
        return stages

    # -- model-dtype weights (module / layer files) ---------------------------------------------
    def _add_module_weights(self, models: dict[str, LoadedPickle], layers: dict[str, LoadedPickle], tp: int,
                            pp: int, b: _Builder, zero3: bool) -> None:
        if zero3:
            return
        for mp, mpath in sorted(self.files.mp_models.items()):
            stage, trank = divmod(mp, tp)
            m = models[mpath].obj
            module = m.get("module")
            if not isinstance(module, dict):
                continue
            buffers = set(m.get("buffer_names") or [])
            shared = m.get("shared_params") or {}
            for k, v in module.items():
                if not isinstance(v, TensorRef) or k in buffers:
                    continue
                if k in shared:  # a tied alias: its own model-dtype copy, kept for the universal writer
                    b.alias_weights.setdefault(k, []).append(Fragment("weight", v, 0, v.numel, 0, trank, stage, 0))
                    continue
                if k not in b.local:  # ZeRO-1 does not record frozen parameters: the module still has them
                    b.shape(k, stage, trank, v.shape)
                    b.frozen.add(k)
                if any(f.state == "weight" and f.tp == trank and f.pp == stage for f in b.frags[k]):
                    continue  # ZeRO-2 frozen_param_fragments already hold it
                b.add(k, Fragment("weight", v, 0, v.numel, 0, trank, stage, 0))
        if not layers:
            return
        stage_of = self._layer_stage_from_shapes(b)
        for (layer, trank), path in sorted(self.files.layers.items()):
            obj = layers[path].obj
            if not isinstance(obj, dict):
                continue
            for k, v in obj.items():
                if not isinstance(v, TensorRef):
                    continue
                name = self._layer_param_name(layer, k, b)
                stage = stage_of.get(name, stage_of.get(f"{layer}", 0))
                if name not in b.local:
                    b.shape(name, stage, trank, v.shape)
                b.add(name, Fragment("weight", v, 0, v.numel, 0, trank, stage, 0))

    def _layer_param_name(self, layer: int, key: str, b: _Builder) -> str:
        name = f"{layer}.{key}"
        if name in b.local:
            return name
        tied = [n for n in b.order if n.startswith("tied_modules.") and n.endswith("." + key)]
        if len(tied) == 1:
            return tied[0]
        return name

    def _layer_stage_from_shapes(self, b: _Builder) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, locs in b.local.items():
            out[name] = min(pp for (pp, _) in locs)
            head = name.split(".", 1)[0]
            if head.isdigit():
                out.setdefault(head, out[name])
        return out

    # -- assembling Params ----------------------------------------------------------------------
    def _params(self, b: _Builder, uc_info: dict, tp: int, shared: dict, dtype: str,
                hints: dict[str, Any] | None) -> tuple[Param, ...]:
        params: list[Param] = []
        true_vocab = uc_info.get("original_vocab_size")
        by_name: dict[str, Param] = {}
        for name in b.order:
            locs = b.local[name]
            spec = classify_deepspeed(name, uc_info, tp, megatron=hints)
            stage0 = min(pp for (pp, _) in locs)
            local_shapes = [locs[(stage0, t)] for t in range(tp) if (stage0, t) in locs]
            if len(local_shapes) < tp and len(local_shapes) > 0 and spec.partitioned:
                self.warnings.append(f"{name}: only {len(local_shapes)} of {tp} tensor-parallel shards found")
            shape = global_shape(spec, local_shapes) if local_shapes else ()
            padded = None
            if spec.vocab and isinstance(true_vocab, int) and shape and shape[0] > true_vocab:
                padded, shape = shape, (true_vocab, *shape[1:])
            frags = b.frags[name]
            if spec.pipeline_replicated:
                frags = [f for f in frags if f.pp == stage0]
            flags = []
            if spec.rule == TpRule.UNKNOWN:
                flags.append("no partition rule matched: DeepSpeed's default (concatenate on dim 0)")
            shards = tuple(Shard(t, p, s) for (p, t), s in sorted(locs.items()))
            param = Param(
                name=name, shape=shape, dtype=_frag_dtype(frags, dtype), shards=shards, partition_dim=spec.dim,
                rule=spec.rule.value, frozen=name in b.frozen, fragments=tuple(frags), padded_shape=padded,
                flags=tuple(flags),
            )
            params.append(param)
            by_name[name] = param
        for alias, source in shared.items():
            src = by_name.get(source)
            if src is None or alias in by_name:
                continue
            params.append(Param(name=alias, shape=src.shape, dtype=src.dtype, shards=src.shards,
                                partition_dim=src.partition_dim, rule=src.rule, tied_to=source,
                                padded_shape=src.padded_shape, fragments=tuple(b.alias_weights.get(alias, ()))))
        return tuple(params)

    def _rank_files(self, tp: int, pp: int) -> tuple[RankFile, ...]:
        tf = self.files
        out: list[RankFile] = []

        def size(p: str) -> int:
            try:
                return os.path.getsize(p)
            except OSError:
                return 0

        for mp, p in sorted(tf.mp_models.items()):
            out.append(RankFile(p, "model_states", size(p), tp=mp % tp, pp=mp // tp))
        for (d, mp), p in sorted(tf.z3_models.items()):
            out.append(RankFile(p, "model_states", size(p), tp=mp % tp, pp=mp // tp, dp=d))
        for (d, mp), p in sorted(tf.optims.items()):
            out.append(RankFile(p, "optim_states", size(p), tp=mp % tp, pp=mp // tp, dp=d))
        for (layer, t), p in sorted(tf.layers.items()):
            out.append(RankFile(p, "layer", size(p), tp=t, layer=layer))
        for p in sorted(tf.experts):
            m = EXPERT_RE.match(os.path.basename(p))
            out.append(RankFile(p, "expert", size(p), tp=int(m.group(3)) % tp if m else None,
                                ep=int(m.group(2)) if m else None))
        for p in sorted(tf.expp):
            out.append(RankFile(p, "expert_optim", size(p)))
        return tuple(out)


def megatron_hints(args: Any, checkpoint_version: Any) -> dict[str, Any] | None:
    """What the Megatron name rules need, from a Megatron-DeepSpeed `args` Namespace (None without one)."""
    if args is None:
        return None
    heads = getattr(args, "num_attention_heads", None)
    groups = getattr(args, "num_query_groups", None) or getattr(args, "num_key_value_heads", None)
    return {"checkpoint_version": checkpoint_version, "swiglu": bool(getattr(args, "swiglu", False)),
            "num_heads": heads, "num_groups": groups}


def param_spec(ckpt: Checkpoint, name: str, *, deepspeed_compat: bool = False) -> TpSpec:
    """The TP rule of one parameter of a DeepSpeed checkpoint (the same the reader used for its shape).

    `deepspeed_compat`: exactly what `ds_to_universal` does (at tp=1 it applies no Megatron name rule, so
    every parameter gets `cat_dim` 0), for outputs that must match DeepSpeed's byte for byte.
    """
    hints = megatron_hints(ckpt.meta.get("args"), ckpt.meta.get("checkpoint_version"))
    if deepspeed_compat and ckpt.degrees.tp == 1:
        hints = None
    return classify_deepspeed(name, ckpt.meta.get("universal_checkpoint_info") or {}, ckpt.degrees.tp, megatron=hints)


def _prod(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _frag_dtype(frags: list[Fragment], default: str) -> str:
    for f in frags:
        if f.state == "weight":
            return f.tensor.dtype
    return default


register(DeepSpeedFormat())
