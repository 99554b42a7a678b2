"""PyTorch DCP and Megatron-Core `torch_dist` checkpoints: `.metadata` chunk boxes over `__R_F.distcp` files."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..layout import Checkpoint, Degrees, Format, Fragment, IterationRef, Param, RankFile, Run
from ..rules import TpRule
from ..safe_unpickle import load_plain_pickle, load_torch_metadata
from ..tensorref import ITEMSIZE, TensorRef
from .base import CheckpointFormat, DirListing, register
from .universal import parallel_map

if TYPE_CHECKING:
    import torch

TRACKER = "latest_checkpointed_iteration.txt"
METADATA = ".metadata"
_ITER_RE = re.compile(r"^iter_(\d+)$")
_DISTCP_RE = re.compile(r"^__(\d+)_(\d+)\.distcp$")
_OPT_STATE_RE = re.compile(r"^optimizer\.state\.([A-Za-z0-9_]+)\.")


@dataclass(frozen=True)
class ChunkBox:
    """One saved chunk's box inside the global tensor: per-dim start offsets and sizes."""

    offsets: tuple[int, ...]
    sizes: tuple[int, ...]

    @property
    def numel(self) -> int:
        return prod(self.sizes)

    @property
    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(o, o + s) for o, s in zip(self.offsets, self.sizes))


def iteration_of(name: str) -> int | None:
    """`iter_0000010` -> 10, `release` -> 0, anything else -> None."""
    if name == "release":
        return 0
    m = _ITER_RE.match(name)
    return int(m.group(1)) if m else None


def _is_dcp_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA))


def _format_of(path: str) -> Format:
    return Format.TORCH_DIST if os.path.isfile(os.path.join(path, "metadata.json")) else Format.DCP


def _ints(value: Any) -> tuple[int, ...]:
    return tuple(int(v) for v in value)


def _dtype_of(props: Any) -> str | None:
    """TensorProperties pickles its fields as a tuple (dtype, layout, requires_grad, memory format, pin_memory)."""
    dtype = getattr(props, "dtype", None)
    state = getattr(props, "state", None)
    if dtype is None and isinstance(state, tuple) and state:
        dtype = state[0]
    return str(dtype) if isinstance(dtype, str) else None


def _contiguous_start(size: Sequence[int], box: ChunkBox) -> int | None:
    """The row-major element offset of `box` when it is one contiguous run of the global tensor, else None."""
    partial = [d for d in range(len(size)) if box.sizes[d] != size[d]]
    if partial and any(box.sizes[d] != 1 for d in range(partial[-1])):
        return None
    start, stride = 0, 1
    for d in reversed(range(len(size))):
        start += box.offsets[d] * stride
        stride *= size[d]
    return start


def _partition(size: tuple[int, ...], boxes: Sequence[ChunkBox], stacked: bool) -> tuple[str, int | None, list[str]]:
    """Rule and partition dim from the chunk boxes; leading unit-size axes of stacked layers are not TP splits."""
    n_stack = 0
    if stacked:
        while n_stack < len(size) - 1 and size[n_stack] > 1 and all(b.sizes[n_stack] == 1 for b in boxes):
            n_stack += 1
    split = [d for d in range(n_stack, len(size)) if len({b.offsets[d] for b in boxes}) > 1]
    flags = [f"stacked: the leading {n_stack} axis(es) index layers/experts"] if n_stack else []
    if not split:
        return TpRule.REPLICATED.value, None, flags
    if len(split) > 1:
        return TpRule.UNKNOWN.value, split[-1], flags + [f"chunks split dims {split}"]
    rel = split[0] - n_stack
    rule = TpRule.COLUMN if rel == 0 else TpRule.ROW if rel == 1 else TpRule.UNKNOWN
    return rule.value, split[0], flags


def _storage_index(md: Any, meta_path: str) -> dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]]:
    storage = getattr(md, "storage_data", None)
    if not isinstance(storage, Mapping):
        raise CheckpointError(meta_path, "DCP metadata has no storage_data map")
    out: dict[tuple[str, tuple[int, ...] | None], tuple[str, int, int]] = {}
    for key, info in storage.items():
        fqn = getattr(key, "fqn", None)
        rel = getattr(info, "relative_path", None)
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not isinstance(fqn, str) or not isinstance(rel, str) or not isinstance(offset, int) \
                or not isinstance(length, int) or offset < 0 or length < 0:
            raise CheckpointError(meta_path, f"malformed storage_data entry {str(key)[:120]}")
        if os.path.isabs(rel) or ".." in rel.replace("\\", "/").split("/"):
            raise CheckpointError(meta_path, f"storage path {rel!r} points outside the checkpoint directory")
        off = getattr(key, "offset", None)
        out[(fqn, _ints(off) if off is not None else None)] = (rel, offset, length)
    return out


class DcpFormat(CheckpointFormat):
    """Megatron `iter_XXXXXXX/` roots with a tracker file, or a lone directory holding `.metadata` + `.distcp` files."""

    format = Format.DCP

    def claim_run(self, listing: DirListing) -> Run | None:
        root = listing.path
        if TRACKER in listing.file_set:
            tags = [d for d in listing.dirs if iteration_of(d) is not None and _is_dcp_dir(os.path.join(root, d))]
            if tags:
                text = (listing.read_text(TRACKER) or "").strip()
                latest = "release" if text == "release" else None
                if latest is None and text.isdigit():
                    latest = next((t for t in tags if iteration_of(t) == int(text) and t != "release"), None)
                its = tuple(IterationRef(root, os.path.join(root, t), t, iteration_of(t), t == latest,
                                         _format_of(os.path.join(root, t))) for t in tags)
                fmt = next((i.format for i in its if i.latest), its[-1].format)
                return Run(root, fmt, its, latest_tag=latest)
        if METADATA in listing.file_set and (
            "metadata.json" in listing.file_set or any(_DISTCP_RE.match(f) for f in listing.files)
        ):
            tag = os.path.basename(root.rstrip(os.sep)) or root
            fmt = _format_of(root)
            return Run(root, fmt, (IterationRef(root, root, tag, iteration_of(tag), True, fmt),), latest_tag=tag)
        return None

    def read(self, ref: IterationRef) -> Checkpoint:
        d = ref.path
        meta_path = os.path.join(d, METADATA)
        loaded = load_plain_pickle(meta_path)
        md = loaded.obj
        sdm = getattr(md, "state_dict_metadata", None)
        if not isinstance(sdm, Mapping):
            raise CheckpointError(meta_path, "not a DCP Metadata pickle (no state_dict_metadata)")
        index = _storage_index(md, meta_path)
        fmt = _format_of(d)
        warnings = [f"unknown pickle globals in .metadata: {', '.join(sorted(loaded.report.unknown_globals))}"
                    ] if loaded.report.unknown_globals else []

        # tensor entries and their chunk locations
        tensors: dict[str, tuple[tuple[int, ...], str, list[ChunkBox]]] = {}
        bytes_entries: list[str] = []
        jobs: list[tuple[str, int, str, int, int]] = []  # (fqn, chunk number, file, offset, length)
        file_sizes: dict[str, int] = {}
        for fqn, entry in sdm.items():
            if not isinstance(fqn, str):
                raise CheckpointError(meta_path, f"state_dict_metadata key {fqn!r} is not a string")
            chunks = getattr(entry, "chunks", None)
            if chunks is None:
                bytes_entries.append(fqn)
                continue
            try:
                size = _ints(getattr(entry, "size", ()))
                all_boxes = [ChunkBox(_ints(c.offsets), _ints(c.sizes)) for c in chunks]
            except (AttributeError, TypeError, ValueError):
                raise CheckpointError(meta_path, f"{fqn}: malformed tensor entry") from None
            dtype = _dtype_of(getattr(entry, "properties", None))
            if dtype is None or dtype not in ITEMSIZE:
                raise CheckpointError(meta_path, f"{fqn}: tensor entry without a known dtype ({dtype})")
            boxes = []
            for i, box in enumerate(all_boxes):
                if len(box.offsets) != len(size) or len(box.sizes) != len(size) or any(
                        o < 0 or o + s > g for o, s, g in zip(box.offsets, box.sizes, size)):
                    raise CheckpointError(meta_path, f"{fqn}: chunk {list(box.offsets)}+{list(box.sizes)} lies "
                                                     f"outside the global shape {list(size)}")
                loc = index.get((fqn, box.offsets))
                if loc is None:
                    raise CheckpointError(meta_path, f"{fqn}: chunk at {list(box.offsets)} has no storage entry")
                path = os.path.join(d, loc[0])
                if path not in file_sizes:
                    try:
                        file_sizes[path] = os.path.getsize(path)
                    except OSError:
                        raise CheckpointError(path, "data file named in .metadata is missing") from None
                if loc[1] + loc[2] > file_sizes[path]:
                    raise CheckpointError(path, f"chunk of {fqn} at bytes {loc[1]}+{loc[2]} lies past the end of the "
                                                f"{file_sizes[path]}-byte file (truncated)")
                boxes.append(box)
                jobs.append((fqn, i, path, loc[1], loc[2]))
            tensors[fqn] = (size, dtype, boxes)

        def load_chunk(job: tuple[str, int, str, int, int]) -> TensorRef:
            fqn, i, path, offset, length = job
            obj = load_torch_metadata(path, base_offset=offset, length=length).obj
            box = tensors[fqn][2][i]
            if not isinstance(obj, TensorRef):
                raise CheckpointError(path, f"chunk of {fqn} at byte {offset} is not a tensor")
            if obj.shape != box.sizes or obj.dtype != tensors[fqn][1]:
                raise CheckpointError(path, f"chunk of {fqn} at byte {offset} is {list(obj.shape)}:{obj.dtype}, "
                                            f".metadata says {list(box.sizes)}:{tensors[fqn][1]}")
            return obj

        refs = dict(zip([(j[0], j[1]) for j in jobs], parallel_map(load_chunk, jobs)))
        lengths = {(j[2], j[3]): j[4] for j in jobs}

        params: list[Param] = []
        dcp_chunks: dict[str, tuple[tuple[ChunkBox, TensorRef], ...]] = {}
        for fqn, (size, dtype, boxes) in tensors.items():
            pairs = tuple((box, refs[(fqn, i)]) for i, box in enumerate(boxes))
            dcp_chunks[fqn] = pairs
            starts = [_contiguous_start(size, box) for box in boxes]
            covered = sum(b.numel for b in boxes)
            flags: list[str] = []
            frags: tuple[Fragment, ...] = ()
            if all(s is not None for s in starts):
                frags = tuple(Fragment("weight", r, 0, b.numel, s) for (b, r), s in zip(pairs, starts) if b.numel)
            else:
                flags.append("chunks are boxes, not flat runs: read with formats.dcp.read_global_tensor")
            if covered != prod(size):
                warnings.append(f"{fqn}: saved chunks hold {covered} of {prod(size)} elements")
            stacked = fmt == Format.TORCH_DIST and ".layers." in f".{fqn}" and not re.search(r"\.layers\.\d+\.", fqn)
            rule, dim, pflags = _partition(size, boxes, stacked)
            params.append(Param(name=fqn, shape=size, dtype=dtype, partition_dim=dim, rule=rule,
                                fragments=frags, flags=tuple(flags + pflags)))

        common, common_src = self._common(d, index, sdm)
        files = self._files(d, file_sizes)
        ranks = sorted({int(m.group(1)) for f in os.listdir(d) if (m := _DISTCP_RE.match(f))})
        degrees, dwarn = self._degrees(common, len(ranks) or 1, fmt)
        warnings += dwarn
        iteration = common.get("iteration") if isinstance(common.get("iteration"), int) else ref.iteration
        opt_states = sorted({m.group(1) for k in sdm if (m := _OPT_STATE_RE.match(str(k)))})
        dtypes = Counter(p.dtype for p in params if not p.name.startswith("optimizer."))
        meta = {
            "dcp_chunks": dcp_chunks,
            "dcp_zip_lengths": lengths,
            "bytes_entries": tuple(bytes_entries),
            "dcp_version": getattr(md, "version", None),
            "common_source": common_src,
            "common_keys": tuple(sorted(str(k) for k in common)),
            "ranks": len(ranks),
        }
        if fmt == Format.TORCH_DIST:
            try:
                with open(os.path.join(d, "metadata.json"), encoding="utf-8") as fh:
                    meta["metadata_json"] = json.load(fh)
            except (OSError, ValueError) as exc:
                warnings.append(f"metadata.json unreadable: {exc}")
        return Checkpoint(
            path=d, run_root=ref.run_root, format=fmt, tag=ref.tag, iteration=iteration, latest=ref.latest,
            degrees=degrees, zero_stage=None, dtype=dtypes.most_common(1)[0][0] if dtypes else None,
            optimizer=("distributed optimizer state" if opt_states else None), optimizer_states=tuple(opt_states),
            files=files, params=tuple(params), meta=meta, warnings=tuple(warnings),
        )

    @staticmethod
    def _common(d: str, index: Mapping, sdm: Mapping) -> tuple[dict[str, Any], str | None]:
        """Megatron's non-sharded state: legacy `common.pt`, else the `common_state` bytes in the DCP files."""
        path = os.path.join(d, "common.pt")
        if os.path.isfile(path):
            obj = load_torch_metadata(path).obj
            return (obj if isinstance(obj, dict) else {}), "common.pt"
        for fqn in sdm:
            if isinstance(fqn, str) and fqn.split("/")[0] == "common_state" and (fqn, None) in index:
                rel, offset, length = index[(fqn, None)]
                obj = load_torch_metadata(os.path.join(d, rel), base_offset=offset, length=length).obj
                return (obj if isinstance(obj, dict) else {}), fqn
        return {}, None

    @staticmethod
    def _degrees(common: Mapping[str, Any], ranks: int, fmt: Format) -> tuple[Degrees, list[str]]:
        args = common.get("args")
        tp = getattr(args, "tensor_model_parallel_size", None)
        if isinstance(tp, int) and tp > 0:
            pp = getattr(args, "pipeline_model_parallel_size", None)
            dp = getattr(args, "data_parallel_size", None)
            return Degrees(tp=tp, pp=pp if isinstance(pp, int) and pp > 0 else 1,
                           dp=dp if isinstance(dp, int) and dp > 0 else 1), []
        if fmt == Format.TORCH_DIST:
            note = f"no saved args: tp={ranks} guessed from the number of ranks that wrote files"
            return Degrees(tp=ranks), [note] if ranks > 1 else []
        note = f"plain DCP: dp={ranks} guessed from the number of ranks that wrote files"
        return Degrees(dp=ranks), [note] if ranks > 1 else []

    @staticmethod
    def _files(d: str, data_sizes: Mapping[str, int]) -> tuple[RankFile, ...]:
        files: list[RankFile] = []
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if not os.path.isfile(path):
                continue
            m = _DISTCP_RE.match(name)
            role = "distcp" if m else {METADATA: "metadata", "metadata.json": "metadata",
                                       "common.pt": "common"}.get(name)
            if role is None:
                continue
            size = data_sizes.get(path)
            files.append(RankFile(path, role, size if size is not None else os.path.getsize(path)))
        return tuple(files)


def _read_chunk(ref: TensorRef, length: int | None) -> torch.Tensor:
    """One chunk's tensor: its own torch zip lies at [base_offset, base_offset + length) of the `.distcp` file."""
    import torch

    from ..tensor_io import read_tensor, torch_dtype
    from ..torchzip import MappedFile, TorchZip

    if length is None or ref.numel == 0:
        return read_tensor(ref)
    z = TorchZip(ref.file, base_offset=ref.base_offset, length=length)
    rec = z.storage_record(ref.storage_key)
    start = z.data_offset(rec)
    extent = ref.extent()
    itemsize = ITEMSIZE.get(ref.dtype, 0)
    mf = MappedFile.open(ref.file)
    if extent * itemsize > rec.size or mf.map is None or start + extent * itemsize > mf.size:
        raise CheckpointError(ref.file, f"chunk at byte {ref.base_offset} is shorter than its tensor (truncated)")
    flat = torch.frombuffer(mf.map, dtype=torch_dtype(ref.dtype), count=extent, offset=start)
    return flat.as_strided(ref.shape, ref.stride, ref.storage_offset).clone()


def read_global_tensor(ckpt: Checkpoint, name: str) -> torch.Tensor:
    """Assemble one global tensor of a DCP / torch_dist checkpoint from its saved chunk boxes."""
    import torch

    from ..tensor_io import torch_dtype

    chunks = ckpt.meta.get("dcp_chunks", {}).get(name)
    if chunks is None:
        raise CheckpointError(ckpt.path, f"no DCP tensor named {name!r}")
    param = ckpt.param(name)
    lengths = ckpt.meta.get("dcp_zip_lengths", {})
    out = torch.empty(param.shape, dtype=torch_dtype(param.dtype))
    covered = 0
    for box, ref in chunks:
        out[box.slices] = _read_chunk(ref, lengths.get((ref.file, ref.base_offset)))
        covered += box.numel
    if covered != param.numel:
        raise CheckpointError(ckpt.path, f"{name}: saved chunks hold {covered} of {param.numel} elements")
    return out


class TorchDistFormat(DcpFormat):
    """The same reader under Format.TORCH_DIST, so `format_for` finds it; discovery claims through DcpFormat."""

    format = Format.TORCH_DIST

    def claim_run(self, listing: DirListing) -> Run | None:
        return None


register(DcpFormat())
register(TorchDistFormat())
