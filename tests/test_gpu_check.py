"""The prepared GPU check (benchmarks/gpu_check.py and the scripts it runs): every stage's steps exist and fit
one 10-minute command, a hung or slow step cannot take more than its share, and what a step measured
survives a kill. Runs anywhere (no GPU needed): the scripts that can run on a CPU are run here, tiny."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)  # also the syntax check
    return module


gpu_check = _load("gpu_check")
incremental = _load("incremental")
changed = _load("changed_cuda_tests")
STAGES = gpu_check.STAGES


def run_script(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=os.environ | {"PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


# --- the stages: steps, budgets, files ------------------------------------------------------------------


@pytest.mark.parametrize("stage", STAGES)
def test_every_step_names_an_existing_script_or_module(stage, tmp_path):
    steps = gpu_check.stage_steps(stage, tmp_path)
    assert steps
    for step in steps:
        assert gpu_check.missing_files(step) == [], step.name


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_is_estimated_within_its_budget_and_every_step_has_its_own_limit(stage, tmp_path):
    steps = gpu_check.stage_steps(stage, tmp_path)
    assert sum(s.estimate_s for s in steps) <= gpu_check.STAGE_BUDGET_S
    assert (
        gpu_check.STAGE_BUDGET_S <= 470
    )  # a remote GPU command may be limited to 10 minutes; stay well inside
    for step in steps:
        assert 0 < step.estimate_s <= step.timeout_s, step.name
    assert len({s.name for s in steps}) == len(steps)


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_leaves_no_more_files_than_a_remote_run_brings_back(stage, tmp_path):
    out = tmp_path / "out"
    steps = gpu_check.stage_steps(stage, out, tmp_path / "work")
    assert len(gpu_check.out_files(steps, out)) <= gpu_check.MAX_OUT_FILES
    for step in steps:  # checkpoints and scratch never go to out (8 files come back from a remote run)
        for flag in ("--checkpoints_dir", "--results_dir", "--work", "--cache-dir"):
            if flag in step.command:
                assert not step.command[step.command.index(flag) + 1].startswith(str(out)), step.name


def test_the_speed_stage_runs_what_the_issue_asks_in_that_order(tmp_path):
    steps = {s.name: s for s in gpu_check.stage_steps("speed", tmp_path)}
    compiled = ["compile_bf16_cl_default_b16", "compile_bf16_cl_reduce_overhead_b16"]
    assert list(steps) == [
        "environment", "build", "kernel_self_check", "graph_check", "bench_train", "crash_probe",
        "cuda_tests_changed", *compiled, "bench_ops",
    ]  # fmt: skip
    graph = steps["graph_check"].command
    assert graph[graph.index("--batch") + 1 : graph.index("--batch") + 3] == ["16", "1"]
    assert int(graph[graph.index("--replays") + 1]) >= 100
    train = steps["bench_train"].command
    assert train[train.index("--batch") + 1] == "16"  # batch 16 first
    assert {"official_eager", "eager_bf16_cl_fusedadam", "fast_path"} <= set(train)
    assert not any(word.startswith("compile") for word in train)
    for name in compiled:
        step = steps[name]
        rows = step.command[step.command.index("--rows") + 1 :]
        assert rows[0] == name.removesuffix("_b16") and rows[1].startswith("--"), "one row per process"
        assert step.optional
    assert "--no-compile" in steps["bench_ops"].command
    assert [s.name for s in steps.values() if s.optional] == compiled  # "while time remains"
    assert steps["build"].essential
    for name in ("graph_check", "bench_train", "crash_probe", "bench_ops"):
        assert steps[name].result and Path(steps[name].result).parent == tmp_path, name


def test_the_other_stages(tmp_path):
    correctness = [s.name for s in gpu_check.stage_steps("correctness", tmp_path)]
    for name in ("cuda_tests", "memcheck", "racecheck", "facades_200_iterations"):
        assert name in correctness
    quality = {s.name: s for s in gpu_check.stage_steps("quality", tmp_path)}
    for name in ("quality_fast", "test_fast", "eval_fast", "quality_plain", "quality_compare"):
        assert name in quality
    assert "--train-parser" in quality["eval_fast"].command  # the FCN-score
    assert gpu_check.stage_steps("1", tmp_path)[3].name == "cuda_tests"  # the first run's numbers still work
    assert gpu_check.stage_steps("2", tmp_path)[3].name == "graph_check"


def test_make_gpu_check_without_arguments_is_the_speed_stage(tmp_path, capsys):
    result = subprocess.run(
        ["make", "-n", "gpu-check", "GPU_PYTHON=python3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "benchmarks/gpu_check.py --stage speed" in result.stdout
    assert "--dry-run" not in result.stdout
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0  # the script's own default too
    listing = capsys.readouterr().out
    assert "stage speed: estimate" in listing and "stage correctness" not in listing


def test_dry_run_lists_every_stage_through_make(tmp_path):
    result = subprocess.run(
        ["make", "-s", "gpu-check", "DRY_RUN=1", "STAGE=all", f"GPU_PYTHON={sys.executable}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for stage in STAGES:
        assert f"stage {stage}: estimate" in result.stdout
        for step in gpu_check.stage_steps(stage, tmp_path):
            assert step.name in result.stdout
    assert "MISSING" not in result.stdout and "OVER BUDGET" not in result.stdout
    assert "(while time remains)" in result.stdout


def test_dry_run_fails_when_a_named_script_is_missing_or_a_stage_is_over_budget(
    monkeypatch, tmp_path, capsys
):
    original = gpu_check.stage_steps

    def with_a_missing_script(stage, out, work=None):
        return [
            *original(stage, out, work),
            gpu_check.Step("ghost", ["python3", "benchmarks/ghost.py"], 10, 1),
        ]

    monkeypatch.setattr(gpu_check, "stage_steps", with_a_missing_script)
    assert gpu_check.main(["--stage", "speed", "--dry-run", "--out", str(tmp_path)]) == 1
    assert "MISSING ghost: benchmarks/ghost.py" in capsys.readouterr().out
    monkeypatch.setattr(gpu_check, "stage_steps", original)
    assert gpu_check.main(["--stage", "speed", "--dry-run", "--budget", "100", "--out", str(tmp_path)]) == 1
    assert "OVER BUDGET speed" in capsys.readouterr().out


def test_all_stages_at_once_are_refused_outside_a_dry_run(tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["--stage", "all", "--out", str(tmp_path)])


# --- running a stage: limits, budget, logs, results ----------------------------------------------------


def test_a_hung_step_is_killed_with_its_children_at_its_limit_and_its_output_kept(tmp_path):
    # The shell's child sleeps on: only killing the whole process group ends it.
    step = gpu_check.Step("hang", ["bash", "-c", "echo started; sleep 60 & sleep 60; echo never"], 60, 1)
    start = time.monotonic()
    record = gpu_check.run_step(step, tmp_path / "log", timeout_s=1.5)
    assert record["status"] == "timed out"
    assert time.monotonic() - start < 10
    assert "started" in record["tail"] and "started" in (tmp_path / "log").read_text()


def stage_of(monkeypatch, steps):
    monkeypatch.setattr(gpu_check, "stage_steps", lambda stage, out, work=None: steps)
    monkeypatch.setattr(gpu_check, "MIN_STEP_S", 1)


def test_the_stage_budget_stops_later_steps_and_the_summary_records_them(monkeypatch, tmp_path):
    stage_of(monkeypatch, [
        gpu_check.Step("first", ["bash", "-c", "echo ok"], 60, 1),
        gpu_check.Step("slow", ["bash", "-c", "sleep 60"], 60, 1),
        gpu_check.Step("never", ["bash", "-c", "echo never"], 60, 1),
    ])  # fmt: skip
    start = time.monotonic()
    assert gpu_check.run_stage("speed", tmp_path, budget_s=2, work=tmp_path / "work") == 1
    assert time.monotonic() - start < 15
    summary = json.loads((tmp_path / "gpu_check_speed.json").read_text())
    statuses = [s["status"] for s in summary["steps"]]
    assert statuses == ["passed", "timed out", "not run: stage budget spent"]
    assert "ok" in summary["steps"][0]["tail"]


def test_an_optional_step_only_takes_the_time_later_steps_leave(monkeypatch, tmp_path, capsys):
    result = tmp_path / "r.json"
    stage_of(monkeypatch, [
        gpu_check.Step("optional", ["bash", "-c", "sleep 60"], 60, 1, optional=True),
        gpu_check.Step("skipped_optional", ["bash", "-c", "echo x"], 60, 1, optional=True),
        gpu_check.Step("required", ["bash", "-c", f"echo '{{\"n\": 1}}' > {result}"], 60, 3,
                       result=str(result)),
    ])  # fmt: skip
    start = time.monotonic()
    # 6 s in all, 3 s reserved for the required step: the first optional one is killed after ~3 s, the second
    # cannot start, the required one runs; optional steps left out for want of time are no failure.
    assert gpu_check.run_stage("speed", tmp_path, budget_s=6, work=tmp_path / "work") == 1
    assert time.monotonic() - start < 12
    summary = json.loads((tmp_path / "gpu_check_speed.json").read_text())
    records = {s["step"]: s for s in summary["steps"]}
    assert records["optional"]["status"] == "timed out" and records["optional"]["timeout_s"] <= 3
    assert records["skipped_optional"]["status"].startswith("not run")
    assert records["required"]["status"] == "passed" and records["required"]["result"] == {"n": 1}
    assert "FAILED or not run: ['optional']" in capsys.readouterr().out


def test_a_failed_build_stops_the_stage(monkeypatch, tmp_path):
    stage_of(monkeypatch, [
        gpu_check.Step("build", ["bash", "-c", "exit 3"], 60, 1, essential=True),
        gpu_check.Step("after", ["bash", "-c", "echo no"], 60, 1),
    ])  # fmt: skip
    assert gpu_check.run_stage("speed", tmp_path, budget_s=60, work=tmp_path / "work") == 1
    summary = json.loads((tmp_path / "gpu_check_speed.json").read_text())
    assert [s["step"] for s in summary["steps"]] == ["build"]


def test_the_headline_survives_partial_and_odd_results():
    summary = {"steps": [
        {"step": "graph_check", "status": "timed out",
         "result": {"batches": [{"batch": 16, "status": "running"}]}},
        {"step": "bench_train", "status": "failed", "result": {"error": "needs CUDA"}},
        {"step": "compile_default_b16", "status": "passed", "result": {"compile_default": {"results": [
            {"batch": 16, "rows": [{"row": "compile_default", "median_ms": 4.0}]}]}}},
        {"step": "crash_probe", "status": "failed",
         "result": {"cases": [{"case": "x", "outcome": "crashed"}]}},
        {"step": "bench_ops", "status": "passed",
         "result": {"speedups": [{"part": "block", "direction": "fwd+bwd"}]}},
        {"step": "eval_fast", "status": "passed", "result": {"image_metrics": {"l1": 0.1}}},
        {"step": "build", "status": "not run: stage budget spent"},
    ]}  # fmt: skip
    text = "\n".join(gpu_check.headline(summary))
    assert "graph b16: incomplete" in text and "error: needs CUDA" in text and "compile_default" in text
    assert "probe x: crashed" in text and "no summary" in text and "l1 0.100" in text


# --- what a step measured survives a kill -----------------------------------------------------------------


def test_incremental_json_is_complete_after_every_change_and_keys_share_a_file(tmp_path):
    path = tmp_path / "r.json"
    report = incremental.IncrementalJson(path, {"rows": []})
    report.append("rows", {"row": 1})
    assert json.loads(path.read_text()) == {"rows": [{"row": 1}]}
    report.append("rows", {"row": 2}, throttle=True)  # within a second of the last write: held back
    assert len(json.loads(path.read_text())["rows"]) == 1
    report.close()
    assert len(json.loads(path.read_text())["rows"]) == 2
    shared = tmp_path / "shared.json"
    incremental.IncrementalJson(shared, {"ms": 1}, key="compile_default")
    incremental.IncrementalJson(shared, {"ms": 2}, key="compile_reduce_overhead")
    assert json.loads(shared.read_text()) == {
        "compile_default": {"ms": 1},
        "compile_reduce_overhead": {"ms": 2},
    }
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_graph_check_keeps_a_finished_batch_when_killed_during_the_next(tmp_path):
    """check_graph.py on the CPU (replays run eagerly), tiny: killed during its second batch size, its JSON
    still holds the first one's timings."""
    path = tmp_path / "graph.json"
    command = [sys.executable, "benchmarks/check_graph.py", "--device", "cpu", "--tiny", "--batch", "2", "1"]
    command += ["--replays", "100", "--profile-replays", "1", "--json", str(path), "--work", str(tmp_path)]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            report = incremental.read_json(path) or {}
            if len(report.get("batches", [])) == 2:
                break
            time.sleep(0.05)
        killed = process.poll() is None
        process.send_signal(signal.SIGKILL)
    finally:
        process.wait()
    report = json.loads(path.read_text())
    first = report["batches"][0]
    assert first["status"] == "done" and first["batch"] == 2
    assert first["cudnn_benchmark"] is True  # timed as fit() runs it
    assert first["check"]["passed"] and first["losses_finite"]
    assert len(first["raw_ms"]) == 100 and {"p20", "p50", "p80"} <= set(first["replay_ms"])
    assert first["profile"]["families"], "a table of kernel (here CPU op) families"
    if killed:
        assert report["batches"][1]["status"] == "running"


def test_the_kernel_benchmark_writes_each_row_and_runs_without_compile(tmp_path):
    path = tmp_path / "ops.json"
    done = run_script("benchmarks/bench_ops.py", "--device", "cpu", "--quick", "--no-compile", "--layers",
                      "C64", "--no-losses", "--json", str(path))  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(path.read_text())
    assert report["complete"] and {r["variant"] for r in report["records"]} == {"fused", "eager"}
    assert report["speedups"] and "C64" in done.stdout  # printed row by row


def test_the_training_benchmark_writes_its_rows_under_its_key(tmp_path):
    path = tmp_path / "train.json"
    done = run_script(
        "benchmarks/bench_train.py", "--device", "cpu", "--quick", "--netG", "unet_128", "--size", "128",
        "--rows", "fast_path", "--rounds", "3", "--max-others", "1", "--key", "one", "--json", str(path),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(path.read_text())["one"]["results"][0]
    assert result["status"] == "done" and [r["row"] for r in result["first_iterations"]] == [
        "official_eager", "fast_path",
    ]  # fmt: skip
    assert {r["row"] for r in result["rows"]} == {"official_eager", "fast_path"}


def test_the_crash_probe_tells_a_raise_from_a_crash_and_keeps_the_stack_traces(tmp_path):
    path = tmp_path / "probe.json"
    done = run_script("benchmarks/crash_probe.py", "--device", "cpu", "--cases", "direct_raise",
                      "selftest_segfault", "--gdb-timeout", "0", "--json", str(path))  # fmt: skip
    assert done.returncode == 1  # a crash is a failure
    cases = {c["case"]: c for c in json.loads(path.read_text())["cases"]}
    assert cases["direct_raise"]["outcome"] == "raised RuntimeError"
    assert "more than 1 value per channel" in cases["direct_raise"]["message"]
    assert cases["selftest_segfault"]["outcome"] == "crashed: SIGSEGV"
    assert "Segmentation fault" in cases["selftest_segfault"]["stderr"]  # faulthandler's Python frames


def test_the_crash_probe_covers_the_cases_the_issue_names():
    probe = _load("crash_probe")
    cases = {name for name, case in probe.CASES.items() if not case.hidden}
    for name in (
        "direct_raise", "nested_raise_no_grad", "nested_raise_with_grad", "nested_raise_other_op_with_grad",
        "nested_raise_other_block_with_grad", "blocks_raise_with_grad", "after_opcheck_compile_with_grad",
        "cpu_control_with_grad",
    ):  # fmt: skip
        assert name in cases
    assert probe.CASES["after_opcheck_compile_with_grad"].prelude
    assert probe.CASES["cpu_control_with_grad"].device == "cpu"


@pytest.mark.slow
def test_the_quality_phases_run_tiny_on_the_cpu(tmp_path, tiny_data):
    report = tmp_path / "quality.json"
    common = ["--tiny", "--device", "cpu", "--dataroot", str(tiny_data), "--checkpoints_dir", str(tmp_path)]
    common += ["--compare-epoch", "1", "--json", str(report)]
    for phase in ("fast", "plain"):
        done = run_script("benchmarks/quality_run.py", phase, *common, "--budget-s", "120")
        assert done.returncode == 0, done.stderr[-2000:]
        assert (tmp_path / f"quality_{phase}" / "epoch_1.pt").is_file()
    where = ["--checkpoints_dir", str(tmp_path), "--compare-epoch", "1", "--json", str(report)]
    done = run_script("benchmarks/quality_run.py", "compare", *where, "--eval-dir", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    result = json.loads(report.read_text())
    assert result["fast"]["finished"] and result["fast"]["iterations"] == 12  # 3 epochs of 4 pairs
    assert result["plain"]["iterations"] == 4  # its first epoch only
    assert result["compare"]["losses_at_equal_iterations"]["iterations_compared"] == 4


def test_the_quality_run_stops_cleanly_at_its_budget(tmp_path, tiny_data):
    report = tmp_path / "quality.json"
    done = run_script(
        "benchmarks/quality_run.py", "fast", "--tiny", "--device", "cpu", "--dataroot", str(tiny_data),
        "--checkpoints_dir", str(tmp_path), "--budget-s", "0", "--json", str(report),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    fast = json.loads(report.read_text())["fast"]
    assert fast["stopped_by_budget"] and not fast["finished"] and fast["iterations"] <= 1


# --- the CUDA tests changed since the last GPU run --------------------------------------------------------


def sources_of(files: dict[str, str]):
    return changed.Sources(files.get)


HELPERS = "SIZE = 4\n\ndef helper():\n    return SIZE\n"
TEST = (
    "import torch\nfrom fastpix2pix import x\n\ndef test_a(fixture):\n    # a comment\n    assert helper()\n"
)


def test_a_fingerprint_ignores_comments_and_follows_helpers_and_fixtures():
    base = {"tests/test_m.py": HELPERS + TEST, "tests/conftest.py": "def fixture():\n    return 1\n"}
    key = "tests/test_m.py::test_a"
    fingerprint = sources_of(base).fingerprint(key)
    assert (
        fingerprint
        and sources_of(base | {"tests/test_m.py": HELPERS + TEST.replace("# a", "# another")}).fingerprint(
            key
        )
        == fingerprint
    )
    assert (
        sources_of(base | {"tests/test_m.py": HELPERS.replace("4", "5") + TEST}).fingerprint(key)
        != fingerprint
    )
    assert (
        sources_of(base | {"tests/conftest.py": "def fixture():\n    return 2\n"}).fingerprint(key)
        != fingerprint
    )


def test_a_fingerprint_is_the_same_on_every_python_version():
    """Python 3.12 added FunctionDef.type_params (ast.dump shows it empty; 3.13 hides it again): the baseline
    written here (3.11) must match what the GPU machine (3.12) computes. Checked by hand on 3.11, 3.12 and
    3.13 for every test function; here, the rule that makes it so."""
    import ast

    text = changed.canonical(ast.parse("def f(x, *, y=None):\n    return x\n"))
    assert "type_params" not in text and "lineno" not in text and "FunctionDef(name='f'" in text


def test_the_selection_takes_new_changed_and_not_passed_tests():
    files = {"tests/test_m.py": HELPERS + TEST + "\ndef test_b():\n    pass\n\ndef test_c():\n    pass\n"}
    sources = sources_of(files)
    baseline = {
        "functions": {
            k: sources.fingerprint(k) for k in ("tests/test_m.py::test_a", "tests/test_m.py::test_b")
        }
        | {"tests/test_m.py::test_gone": "0"},
        "nodes": {"tests/test_m.py::test_a[cuda]": "passed", "tests/test_m.py::test_b": "crashed"},
    }
    baseline["functions"]["tests/test_m.py::test_b"] = "stale"
    nodes = ["tests/test_m.py::test_a[cuda]", "tests/test_m.py::test_a[cpu]", "tests/test_m.py::test_b",
             "tests/test_m.py::test_c"]  # fmt: skip
    chosen = changed.select(nodes, baseline, sources)
    assert chosen == {
        "tests/test_m.py::test_a[cpu]": "new parametrisation",
        "tests/test_m.py::test_b": "changed since the last GPU run",
        "tests/test_m.py::test_c": "new test",
    }
    baseline["functions"]["tests/test_m.py::test_b"] = sources.fingerprint("tests/test_m.py::test_b")
    assert (
        changed.select(nodes, baseline, sources)["tests/test_m.py::test_b"] == "crashed on the last GPU run"
    )


def test_the_baseline_is_the_first_gpu_run_and_every_node_has_an_outcome():
    baseline = changed.load_baseline()
    assert baseline["commit"].startswith("2714e42")
    outcomes = list(baseline["nodes"].values())
    assert len(outcomes) == 300 and outcomes.count("passed") == 255 and outcomes.count("not run") == 41
    assert baseline["nodes"][
        "tests/test_ops.py::test_one_value_per_channel_in_training_raises_like_pytorch[cuda]"
    ] == ("crashed")


def test_junit_outcomes_become_node_ids(tmp_path):
    xml = tmp_path / "j.xml"
    xml.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_ops" name="test_x[cuda]"/>'
        '<testcase classname="tests.test_ops" name="test_y"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_ops" name="test_z"><skipped/></testcase></testsuite></testsuites>'
    )
    assert changed.junit_outcomes(xml) == {
        "tests/test_ops.py::test_x[cuda]": "passed",
        "tests/test_ops.py::test_y": "failed",
        "tests/test_ops.py::test_z": "skipped",
    }
