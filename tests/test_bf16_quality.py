"""benchmarks/bf16_quality.py: the verdict it draws from the runs, and a tiny run of the whole protocol."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("bf16_quality", ROOT / "benchmarks" / "bf16_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(precision: str, seed: int, l1: float, psnr: float, status: str = "done") -> dict:
    return {"precision": precision, "seed": seed, "status": status, "metrics": {"l1": l1, "psnr": psnr},
            "losses": [{"iter": 100 * k, "G_L1": 30.0 - k} for k in range(10)]}  # fmt: skip


def test_the_verdict_compares_the_means_with_the_seed_spread() -> None:
    script = load_script()
    fp32 = [run("fp32", 0, 0.170, 13.0), run("fp32", 1, 0.180, 12.6), run("fp32", 2, 0.175, 12.8)]
    close = [run("bf16", 0, 0.172, 12.9), run("bf16", 1, 0.178, 12.7), run("bf16", 2, 0.176, 12.8)]
    summary = script.summarize(fp32 + close + [run("bf16", 3, 9.0, 1.0, status="failed")])
    assert summary["bf16"]["runs"] == 3  # the failed run is left out
    assert summary["fp32"]["l1"]["mean"] == pytest.approx(0.175)
    assert summary["fp32"]["l1"]["std"] == pytest.approx(0.005)
    assert summary["bf16_within_spread"] and summary["verdict"]["l1"]["within_spread"]
    assert summary["fp32"]["G_L1_last_fifth"]["mean"] == pytest.approx(21.5)  # the last 2 of 10 points
    worse = [run("bf16", k, 0.175 + 0.02, 12.8) for k in range(3)]
    worse[0]["metrics"]["l1"] += 0.001  # a spread of its own
    summary = script.summarize(fp32 + worse)
    assert not summary["verdict"]["l1"]["within_spread"] and not summary["bf16_within_spread"]
    assert not script.summarize(fp32[:1] + close[:1])["verdict"]  # one seed each: no spread, no verdict


def test_a_tiny_protocol_runs_both_precisions_and_collects(tmp_path: Path, tiny_data: Path) -> None:
    common = [
        "--work",
        str(tmp_path),
        "--dataroot",
        str(tiny_data),
        "--epochs",
        "1",
        "1",
        "--max-images",
        "2",
    ]
    for precision in ("fp32", "bf16"):
        done = subprocess.run(
            [sys.executable, "benchmarks/bf16_quality.py", "run", "--precision", precision, *common],
            cwd=ROOT, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
    report = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, "benchmarks/bf16_quality.py", "collect", *common, "--json", str(report)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(report.read_text())
    runs = {r["precision"]: r for r in result["runs"]}
    assert set(runs) == {"fp32", "bf16"} and all(r["status"] == "done" for r in runs.values())
    assert runs["bf16"]["fast_path"]["bf16"] and not runs["fp32"]["fast_path"]["bf16"]
    assert runs["bf16"]["iterations"] == 4 and runs["bf16"]["losses"]  # 2 epochs of 2 images
    assert 0 < runs["fp32"]["metrics"]["l1"] < 1 and runs["fp32"]["metrics"]["psnr"] > 0
    assert result["environment"]["cpu"]["model"] and result["summary"]["bf16"]["runs"] == 1
