"""`check` on real fixtures: clean ones pass; TP replicas that drifted, missing ranks and truncation are reported."""

from __future__ import annotations

import os
import shutil

import pytest
from fixture_paths import FIXTURES, case_dirs

from app.cli import main

CLEAN = [c for c in case_dirs() if "dropout01" not in c]


@pytest.mark.parametrize("case", CLEAN)
def test_clean_fixture_passes(case: str, capsys) -> None:
    assert main(["check", os.path.join(FIXTURES, case, "ckpt")]) == 0, capsys.readouterr().out


def test_dropout_case_flags_replicas_that_differ(capsys) -> None:
    root = os.path.join(FIXTURES, "megatron-deepspeed", "gpt_pipe_tp2_pp2_dp1_bf16_dropout01", "ckpt")
    assert main(["check", root]) == 1
    out = capsys.readouterr().out
    assert "input_layernorm.weight: tensor-parallel replicas differ between tp rank 0 and tp rank 1" in out


def test_missing_rank_and_truncated_file(tmp_path, capsys) -> None:
    src = tmp_path / "ckpt"
    shutil.copytree(os.path.join(FIXTURES, "deepspeed-0.19.8", "z2_fp32_ws4", "ckpt"), src)
    tag = src / "global_step3"
    (tag / "zero_pp_rank_3_mp_rank_00_optim_states.pt").unlink()
    assert main(["check", str(src)]) == 1
    out = capsys.readouterr().out
    assert "missing optimizer file for dp rank 3" in out or "dp rank 3" in out

    shutil.rmtree(src)
    shutil.copytree(os.path.join(FIXTURES, "deepspeed-0.19.8", "z2_fp32_ws4", "ckpt"), src)
    victim = tag / "zero_pp_rank_2_mp_rank_00_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:-3000])
    assert main(["check", str(src)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(victim.name in line for line in lines)


def test_usage_error_exits_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["check"])
    assert exc.value.code == 2
