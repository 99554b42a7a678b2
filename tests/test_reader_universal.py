"""Universal-checkpoint reader on every real `ds_to_universal` output under tests/fixtures (truth: expected.json).

`torch.load(weights_only=False)` is used here ONLY as the oracle, on these trusted fixtures.
"""

from __future__ import annotations

import json
import shutil
from math import prod
from pathlib import Path

import pytest
import torch
from fixture_paths import assert_reads_without_torch

from engine.discover import discover, read_checkpoint
from engine.errors import CheckpointError
from engine.formats.universal import STATES
from engine.layout import Format
from engine.safe_unpickle import load_torch_metadata
from engine.tensor_io import read_tensor

FIXTURES = Path(__file__).parent / "fixtures"
TREES = sorted(FIXTURES.glob("**/expected/universal"))


def _case(tree: Path) -> Path:
    return tree.parent.parent


def _tag_dir(tree: Path) -> Path:
    return tree / (tree / "latest_universal").read_text().strip()


def _dropped(exp: dict, tag_dir: Path) -> set[str]:
    """What ds_to_universal leaves out (fixtures README): under ZeRO-3, frozen params and the tied alias."""
    if exp.get("zero_stage") != 3:
        return set()
    frozen: set[str] = set()
    for f in tag_dir.glob("*model_states.pt"):
        frozen |= set(load_torch_metadata(str(f)).obj.get("frozen_param_shapes") or {})
    return frozen | set(exp.get("tied") or {})


def _oracle(path: Path) -> torch.Tensor:
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return obj["param"] if isinstance(obj, dict) else obj


def test_fixture_trees_exist():
    assert len(TREES) >= 30


@pytest.mark.parametrize("tree", TREES, ids=lambda t: f"{_case(t).parent.name}/{_case(t).name}")
def test_universal_tree(tree: Path):
    exp = json.loads((_case(tree) / "expected.json").read_text())
    tag_dir = _tag_dir(tree)
    runs = discover(str(tree))
    assert [r.format for r in runs] == [Format.UNIVERSAL]
    run = runs[0]
    assert run.latest_tag == tag_dir.name
    ref = next(it for it in run.iterations if it.latest)
    ckpt = read_checkpoint(ref)
    assert ckpt.format == Format.UNIVERSAL
    assert ckpt.iteration == exp["iteration"]
    assert (ckpt.degrees.tp, ckpt.degrees.pp, ckpt.degrees.dp) == (exp["tp"], exp["pp"], exp["dp"])
    assert ckpt.zero_stage == exp["zero_stage"]

    dropped = _dropped(exp, tag_dir)
    want = {name: tuple(shape) for name, shape in exp["params"].items() if name not in dropped}
    got = {p.name: p.shape for p in ckpt.params}
    assert got == want
    if exp.get("zero_stage") != 3:
        assert not dropped

    for p in ckpt.params:
        assert p.dtype == "float32"
        present = {f.stem for f in (tag_dir / "zero" / p.name).glob("*.pt")} - {"step"}
        assert set(p.states) == present
        assert p.tied_to is not None or p.frozen or present == set(STATES)  # only these lack moments
        for frag in p.fragments:
            assert (frag.src_start, frag.dst_start, frag.numel) == (0, 0, p.numel)
        fp32_path = tag_dir / "zero" / p.name / "fp32.pt"
        oracle = _oracle(fp32_path)
        if oracle.dim() == 1 and len(p.shape) != 1:  # ZeRO-3 writes a bare flat tensor
            assert oracle.numel() == prod(p.shape)
        else:
            assert tuple(oracle.shape) == p.shape
        (frag,) = p.fragments_of("fp32")
        assert torch.equal(read_tensor(frag.tensor).reshape(-1), oracle.reshape(-1))
    for alias, source in (exp.get("tied") or {}).items():
        if alias in got:
            assert ckpt.param(alias).tied_to == source


def test_lone_tag_dir_is_claimed():
    tree = FIXTURES / "deepspeed-0.19.8" / "z3_fp32_ws2_subgroups" / "expected" / "universal"
    tag_dir = _tag_dir(tree)
    runs = discover(str(tag_dir))
    assert len(runs) == 1 and runs[0].format == Format.UNIVERSAL
    (ref,) = runs[0].iterations
    assert ref.path == str(tag_dir) and ref.iteration == 3 and ref.latest
    ckpt = read_checkpoint(ref)
    assert ckpt.param("layers.2.weight").shape == (64, 64)  # true shape from param_shapes sub-group 0
    assert ckpt.param("layers.3.weight").shape == (64, 64)  # ... and from sub-group 1
    assert ckpt.zero_stage == 3 and ckpt.degrees.dp == 2


@pytest.mark.parametrize("case, param", [
    ("deepspeed-0.19.8/z1_fp32_ws2", "layers.0.weight"),  # few files: read in this thread
    ("megatron-deepspeed/gpt_nopipe_tp2_pp1_dp2_bf16", "language_model.encoder.layers.2.mlp.dense_h_to_4h.weight"),
])
def test_truncated_state_file_names_the_file(tmp_path: Path, case: str, param: str):
    src = FIXTURES / case / "expected" / "universal"
    dst = tmp_path / "universal"
    shutil.copytree(src, dst)
    for p in dst.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    bad = _tag_dir(dst) / "zero" / param / "exp_avg.pt"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    (run,) = discover(str(dst))
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(run.iterations[0])
    assert str(bad) in str(info.value)
    assert "\n" not in str(info.value)


def test_non_universal_dirs_are_not_claimed():
    runs = discover(str(FIXTURES / "megatron-core-0.16.1"))
    assert all(r.format != Format.UNIVERSAL for r in runs)




def test_metadata_read_does_not_import_torch():
    assert_reads_without_torch(FIXTURES / "megatron-deepspeed" / "gpt_pipe_tp2_pp2_dp1_bf16" / "expected" / "universal")


def test_universal_copy_inside_a_deepspeed_root(tmp_path: Path):
    """ds_to_universal writing into the training root: DeepSpeed keeps the root, the universal tag is its own run."""
    case = FIXTURES / "deepspeed-0.19.8" / "z1_fp32_ws2"
    root = tmp_path / "root"
    shutil.copytree(case / "ckpt", root)
    shutil.copytree(case / "expected" / "universal", root, dirs_exist_ok=True)
    runs = {r.format: r for r in discover(str(root))}
    assert runs[Format.UNIVERSAL].root == str(root / "global_step3_universal")
    assert runs[Format.DEEPSPEED].root == str(root)
    want = json.loads((case / "expected.json").read_text())["params"]
    assert {p.name for p in read_checkpoint(runs[Format.UNIVERSAL].iterations[0]).params} == set(want)
