"""The convert command as a user drives it: progress, refusal to overwrite, resume, clean failure, dry run."""

from __future__ import annotations

import os
import shutil

import torch
from fixture_paths import FIXTURES

from app.cli import main

SRC = os.path.join(FIXTURES, "deepspeed-0.19.8", "z2_fp32_ws2", "ckpt")


def test_convert_refuses_nonempty_destination(tmp_path, capsys) -> None:
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["convert", SRC, str(dst), "--to", "universal", "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (dst / "keep.txt").read_text() == "mine"
    assert main(["convert", SRC, str(dst), "--to", "universal", "--quiet", "--overwrite"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "latest_universal").exists()


def test_dry_run_writes_nothing(tmp_path, capsys) -> None:
    dst = tmp_path / "out"
    assert main(["convert", SRC, str(dst), "--to", "safetensors", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "plan:" in out and "layers.0.weight" in out and "disk needed" in out
    assert not dst.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_resume_skips_verified_items_and_redoes_damaged_ones(tmp_path) -> None:
    import threading

    from app.cli import resolve_source
    from engine.execute import Cancelled, execute_plan, partial_dir
    from engine.plan import Target, plan_conversion

    ckpt = resolve_source(SRC)
    plan = plan_conversion(ckpt, Target("universal"))
    dst = str(tmp_path / "out")
    cancel = threading.Event()
    seen = []

    def stop_after_three(event) -> None:
        if event.kind.value == "item_done":
            seen.append(event.item)
            if len(seen) == 3:
                cancel.set()

    try:
        execute_plan(plan, dst, workers=1, on_event=stop_after_three, cancel=cancel)
        raise AssertionError("expected Cancelled")
    except Cancelled:
        pass
    assert not os.path.exists(dst) and os.path.isdir(partial_dir(dst))
    # damage one completed output: resume must redo it, not trust the journal
    damaged = next(i for i in plan.items if i.id == seen[0])
    with open(os.path.join(partial_dir(dst), damaged.outputs[0]), "ab") as fh:
        fh.write(b"garbage")
    events = []
    result = execute_plan(plan, dst, workers=1, resume=True, on_event=events.append)
    skipped = {e.item for e in events if e.kind.value == "item_skipped"}
    assert skipped == set(seen[1:3])
    assert result.items_skipped == 2 and result.verified
    fresh = str(tmp_path / "fresh")
    execute_plan(plan, fresh, workers=1)
    for item in plan.items:
        if item.kind == "universal_optimizer_state":  # pickles DeepSpeed class names: torch.load needs DeepSpeed
            continue
        for rel in item.outputs:
            a = torch.load(os.path.join(dst, rel), weights_only=False)
            b = torch.load(os.path.join(fresh, rel), weights_only=False)
            if isinstance(a, dict) and "param" in a:
                assert torch.equal(a["param"], b["param"]), rel
            elif torch.is_tensor(a):
                assert torch.equal(a, b), rel
            else:  # copied model-state files
                assert open(os.path.join(dst, rel), "rb").read() == open(os.path.join(fresh, rel), "rb").read()


def test_bad_input_leaves_no_partial_output(tmp_path, capsys) -> None:
    src = tmp_path / "src"
    shutil.copytree(SRC, src)
    optim = next((src / "global_step3").glob("zero_pp_rank_1_*optim_states.pt"))
    data = optim.read_bytes()
    optim.write_bytes(data[: len(data) // 2])
    dst = tmp_path / "out"
    rc = main(["convert", str(src), str(dst), "--to", "universal", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and optim.name in err[0]
    assert not dst.exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


def test_pool_output_equals_in_process_output(tmp_path) -> None:
    src = os.path.join(FIXTURES, "megatron-deepspeed", "gpt_pipe_tp2_pp2_dp1_bf16", "ckpt")
    assert main(["convert", src, str(tmp_path / "a"), "--to", "safetensors", "--workers", "2", "--quiet"]) == 0
    assert main(["convert", src, str(tmp_path / "b"), "--to", "safetensors", "--workers", "1", "--quiet"]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
