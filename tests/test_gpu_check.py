"""The prepared GPU check (benchmarks/gpu_check.py): its steps exist, fit the stage budget, and a hung or
slow step cannot take more than its share. Runs anywhere (no GPU needed)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # also the syntax check
    return module


gpu_check = _load()


@pytest.mark.parametrize("stage", [1, 2])
def test_every_step_names_an_existing_script_or_module(stage, tmp_path):
    steps = gpu_check.stage_steps(stage, tmp_path)
    assert steps
    for step in steps:
        assert gpu_check.missing_files(step) == [], step.name


@pytest.mark.parametrize("stage", [1, 2])
def test_each_stage_is_estimated_within_its_budget(stage, tmp_path):
    steps = gpu_check.stage_steps(stage, tmp_path)
    assert sum(s.estimate_s for s in steps) <= gpu_check.STAGE_BUDGET_S
    assert gpu_check.STAGE_BUDGET_S < 8 * 60  # a lent GPU's command may run 10 minutes; stay well inside


def test_dry_run_lists_the_steps_through_make(tmp_path):
    result = subprocess.run(
        ["make", "-s", "gpu-check", "DRY_RUN=1", f"GPU_PYTHON={sys.executable}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in (1, 2):
        for step in gpu_check.stage_steps(stage, tmp_path):
            assert step.name in result.stdout
    assert "MISSING" not in result.stdout


def test_dry_run_fails_when_a_named_script_is_missing(monkeypatch, tmp_path, capsys):
    original = gpu_check.stage_steps

    def with_a_missing_script(stage, out):
        return [*original(stage, out), gpu_check.Step("ghost", ["python3", "benchmarks/ghost.py"], 10, 1)]

    monkeypatch.setattr(gpu_check, "stage_steps", with_a_missing_script)
    assert gpu_check.main(["--stage", "1", "--dry-run", "--out", str(tmp_path)]) == 1
    assert "MISSING ghost: benchmarks/ghost.py" in capsys.readouterr().out


def test_a_hung_step_is_killed_with_its_children_at_its_limit(tmp_path):
    # The shell's child sleeps on: only killing the whole process group ends it.
    step = gpu_check.Step("hang", ["bash", "-c", "sleep 60 & sleep 60; echo never"], 60, 1)
    start = time.monotonic()
    record = gpu_check.run_step(step, tmp_path / "log", timeout_s=1.0)
    assert record["status"] == "timed out"
    assert time.monotonic() - start < 10


def test_the_stage_budget_stops_later_steps_and_the_summary_records_them(monkeypatch, tmp_path):
    steps = [
        gpu_check.Step("first", ["bash", "-c", "echo ok"], 60, 1),
        gpu_check.Step("slow", ["bash", "-c", "sleep 60"], 60, 1),
        gpu_check.Step("never", ["bash", "-c", "echo never"], 60, 1),
    ]
    monkeypatch.setattr(gpu_check, "stage_steps", lambda stage, out: steps)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1)
    start = time.monotonic()
    assert gpu_check.run_stage(1, tmp_path, budget_s=2) == 1
    assert time.monotonic() - start < 15
    summary = __import__("json").loads((tmp_path / "gpu_check_stage1.json").read_text())
    statuses = [s["status"] for s in summary["steps"]]
    assert statuses == ["passed", "timed out", "not run: stage budget spent"]
    assert "ok" in summary["steps"][0]["tail"]
