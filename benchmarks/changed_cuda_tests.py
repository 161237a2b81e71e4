"""The CUDA tests added or changed since the last GPU run, and those that did not pass on it: select and run.

``gpu_tests_baseline.json`` (beside this file) records the last GPU run: its commit, a fingerprint of every
test function at that commit, and the outcome of every CUDA test node on that run (passed, failed, crashed,
skipped, not run). Here, on any machine and without git (a copy of the working tree is enough),
the CUDA tests of the tree (``pytest --collect-only -m cuda``) are compared with it; a node is selected when
its function is new, its fingerprint differs, its parametrisation is new, or it did not pass on that run.

A fingerprint is the hash of the function's AST (comments and formatting do not count) together with the
ASTs of what it uses by name, transitively: the module's functions, classes and constants, the fixtures of
``tests/conftest.py`` it takes, and the helpers it imports from modules in ``tests/`` (``tiny_run``, ...).
Changes in the package itself do not select tests (the whole suite runs in the correctness stage).

    python3 benchmarks/changed_cuda_tests.py --list                   # what would run, and why
    python3 benchmarks/changed_cuda_tests.py --run --json out.json    # run them (pytest-xdist when present)
    python benchmarks/changed_cuda_tests.py --write-baseline COMMIT --outcomes junit.xml   # after a GPU run

``--write-baseline`` reads the test files of COMMIT with ``git show`` and the outcomes from the GPU run's
JUnit XML (``pytest --junitxml``; the correctness stage writes one) or a JSON ``{node: outcome}``; nodes of
the baseline's collection (``--collected``, one node id a line) that have no outcome are "not run".
"""

from __future__ import annotations

import argparse
import ast
import datetime
import hashlib
import importlib.util
import json
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BASELINE = HERE / "gpu_tests_baseline.json"
TESTS = "tests"


# --- fingerprints --------------------------------------------------------------------------------------


def canonical(node: Any) -> str:
    """An AST as text without positions and without empty fields: the same on every Python version that
    parses the source alike (``ast.dump`` shows 3.12's new ``type_params=[]``, for one; 3.13 hides it)."""
    if isinstance(node, ast.AST):
        fields = (
            f"{name}={canonical(value)}" for name, value in ast.iter_fields(node) if value not in (None, [])
        )
        return f"{type(node).__name__}({','.join(fields)})"
    if isinstance(node, list):
        return "[" + ",".join(canonical(item) for item in node) + "]"
    return repr(node)


def _definitions(tree: ast.Module) -> dict[str, list[ast.AST]]:
    """Module-level names -> the statements that define them (defs, classes, assignments, imports)."""
    found: dict[str, list[ast.AST]] = {}
    for node in tree.body:
        names: list[str] = []
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names = [node.name]
        elif isinstance(node, ast.Assign):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            names += [
                e.id
                for t in node.targets
                if isinstance(t, ast.Tuple)
                for e in t.elts
                if isinstance(e, ast.Name)
            ]
        elif isinstance(node, ast.AnnAssign | ast.AugAssign) and isinstance(node.target, ast.Name):
            names = [node.target.id]
        elif isinstance(node, ast.ImportFrom):
            names = [alias.asname or alias.name for alias in node.names]
        for name in names:
            found.setdefault(name, []).append(node)
    return found


def _used_names(node: ast.AST) -> set[str]:
    names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):  # fixtures, by argument name
        names |= {a.arg for a in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]}
    return names


class Sources:
    """Parsed test modules, read from the tree or from a commit (``read`` maps a path to its text)."""

    def __init__(self, read: Callable[[str], str | None]) -> None:
        self.read = read
        self._cache: dict[str, tuple[ast.Module, dict[str, list[ast.AST]]] | None] = {}

    def module(self, path: str) -> tuple[ast.Module, dict[str, list[ast.AST]]] | None:
        if path not in self._cache:
            text = self.read(path)
            try:
                tree = ast.parse(text) if text is not None else None
            except SyntaxError:
                tree = None
            self._cache[path] = (tree, _definitions(tree)) if tree is not None else None
        return self._cache[path]

    def _closure(
        self, path: str, roots: Iterable[ast.AST], seen: set[tuple[str, str]], parts: list[str]
    ) -> None:
        """Add the dumps of what ``roots`` (statements of module ``path``) use, transitively."""
        parsed = self.module(path)
        if parsed is None:
            return
        _, definitions = parsed
        conftest = self.module(f"{TESTS}/conftest.py")
        pending = [name for root in roots for name in sorted(_used_names(root))]
        while pending:
            name = pending.pop()
            where, statements = path, definitions.get(name)
            if statements is None and conftest is not None and name in conftest[1]:
                where, statements = f"{TESTS}/conftest.py", conftest[1][name]
            if statements is None or (where, name) in seen:
                continue
            seen.add((where, name))
            for statement in statements:
                if isinstance(statement, ast.ImportFrom):  # a helper module beside the tests
                    helper = (
                        f"{TESTS}/{statement.module}.py" if statement.module and not statement.level else None
                    )
                    if helper and self.module(helper) is not None:
                        target = self.module(helper)[1].get(name, [])  # type: ignore[index]
                        parts += [f"{helper}::{name}", *(canonical(t) for t in target)]
                        self._closure(helper, target, seen, parts)
                    continue
                parts.append(f"{where}::{name}")
                parts.append(canonical(statement))
                pending += sorted(_used_names(statement))

    def fingerprint(self, key: str) -> str | None:
        """The hash of test function ``key`` ("tests/f.py::test_x" or "tests/f.py::TestC::test_x")."""
        path, *names = key.split("::")
        parsed = self.module(path)
        if parsed is None:
            return None
        tree, _ = parsed
        scope: list[ast.stmt] = tree.body
        node: ast.AST | None = None
        enclosing: list[ast.AST] = []
        for name in names:
            node = next(
                (
                    n
                    for n in scope
                    if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and n.name == name
                ),
                None,
            )
            if node is None:
                return None
            if isinstance(node, ast.ClassDef):
                enclosing.append(node)
                scope = node.body
        assert node is not None
        parts = [canonical(node)]
        parts += [canonical(d) for c in enclosing for d in c.decorator_list]  # type: ignore[attr-defined]
        self._closure(path, [node], set(), parts)
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()

    def test_functions(self, paths: Iterable[str]) -> dict[str, str]:
        """Every ``test_*`` function (and ``Test*`` class method) of ``paths``: key -> fingerprint."""
        out: dict[str, str] = {}
        for path in paths:
            parsed = self.module(path)
            if parsed is None:
                continue
            for node in parsed[0].body:
                keys = []
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
                    keys = [f"{path}::{node.name}"]
                elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                    keys = [
                        f"{path}::{node.name}::{m.name}"
                        for m in node.body
                        if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef) and m.name.startswith("test")
                    ]
                for key in keys:
                    fingerprint = self.fingerprint(key)
                    if fingerprint is not None:
                        out[key] = fingerprint
        return out


def tree_sources(root: Path = ROOT) -> Sources:
    def read(path: str) -> str | None:
        try:
            return (root / path).read_text()
        except OSError:
            return None

    return Sources(read)


def commit_sources(commit: str, root: Path = ROOT) -> Sources:
    def read(path: str) -> str | None:
        done = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=root, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else None

    return Sources(read)


def function_key(node_id: str) -> str:
    """``tests/f.py::test_x[cuda-2]`` -> ``tests/f.py::test_x``."""
    return node_id.split("[", 1)[0]


# --- selecting -------------------------------------------------------------------------------------------


def select(nodes: list[str], baseline: dict[str, Any], sources: Sources) -> dict[str, str]:
    """The nodes to run, each with why."""
    functions, outcomes = baseline.get("functions", {}), baseline.get("nodes", {})
    chosen: dict[str, str] = {}
    fingerprints: dict[str, str | None] = {}
    for node in nodes:
        key = function_key(node)
        if key not in fingerprints:
            fingerprints[key] = sources.fingerprint(key)
        if key not in functions:
            chosen[node] = "new test"
        elif fingerprints[key] != functions[key]:
            chosen[node] = "changed since the last GPU run"
        elif node not in outcomes:
            chosen[node] = "new parametrisation"
        elif outcomes[node] != "passed":
            chosen[node] = f"{outcomes[node]} on the last GPU run"
    return chosen


def collect_cuda_nodes(python: str = sys.executable) -> list[str]:
    """The CUDA-marked test nodes of the tree, in pytest's order."""
    done = subprocess.run(
        [python, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:cacheprovider", TESTS],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    nodes = [line.strip() for line in done.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    if not nodes and done.returncode not in (0, 5):
        raise RuntimeError(f"pytest --collect-only failed ({done.returncode}): {done.stdout[-2000:]}")
    return nodes


def junit_outcomes(path: Path) -> dict[str, str]:
    """``{node id: passed|failed|skipped}`` from a pytest JUnit XML file."""
    outcomes: dict[str, str] = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        classname, name = case.get("classname", ""), case.get("name", "")
        parts = classname.split(".")
        # "tests.test_ops" or "tests.test_f.TestC": the module is the longest prefix that is a file.
        for cut in range(len(parts), 0, -1):
            module = "/".join(parts[:cut]) + ".py"
            if (ROOT / module).is_file() or cut == 1:
                node = "::".join([module, *parts[cut:], name])
                break
        if case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        elif case.find("skipped") is not None:
            outcome = "skipped"
        else:
            outcome = "passed"
        outcomes[node] = outcome
    return outcomes


def load_baseline(path: Path = BASELINE) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# --- running ---------------------------------------------------------------------------------------------


def run_selected(chosen: dict[str, str], work: Path, workers: int) -> dict[str, Any]:
    junit = work / "changed_cuda_tests.xml"
    junit.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "-q", "--timeout", "120", "-p", "no:cacheprovider", "-rfEs"]
    command += ["--tb=short", f"--junitxml={junit}"]
    if importlib.util.find_spec("xdist") and workers > 1 and len(chosen) > 1:
        command += ["-n", str(workers)]  # a crash then loses one test, not the rest
    done = subprocess.run([*command, *chosen], cwd=ROOT)
    result: dict[str, Any] = {"returncode": done.returncode, "command": command[:12]}
    if junit.is_file():
        outcomes = junit_outcomes(junit)
        result["outcomes"] = {
            k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "skipped")
        }
        result["failed"] = sorted(n for n, v in outcomes.items() if v == "failed")
        result["skipped"] = sorted(n for n, v in outcomes.items() if v == "skipped")
        result["missing"] = sorted(set(chosen) - set(outcomes))
    else:
        result["outcomes"] = {"unknown": "no JUnit XML: pytest crashed (see the log)"}
    return result


def write_baseline(commit: str, outcomes_path: Path, collected: Path | None) -> dict[str, Any]:
    sources = commit_sources(commit)
    files = subprocess.run(
        ["git", "ls-tree", "--name-only", commit, f"{TESTS}/"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    tests = [f for f in files if f.startswith(f"{TESTS}/test_") and f.endswith(".py")]
    if outcomes_path.suffix == ".xml":
        outcomes = junit_outcomes(outcomes_path)
    else:
        outcomes = json.loads(outcomes_path.read_text())
    nodes = (
        [n.strip() for n in collected.read_text().splitlines() if n.strip()] if collected else list(outcomes)
    )
    full = subprocess.run(
        ["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "commit": full or commit,
        "written": datetime.date.today().isoformat(),
        "functions": sources.test_functions(tests),
        "nodes": {node: outcomes.get(node, "not run") for node in nodes} | outcomes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--list", action="store_true", help="print the selection and why")
    parser.add_argument("--run", action="store_true", help="run the selection with pytest")
    parser.add_argument("--json", type=Path, help="write the selection (and the outcomes) here")
    parser.add_argument("--workers", type=int, default=4, help="pytest-xdist workers (when installed)")
    parser.add_argument("--baseline", type=Path, default=BASELINE)
    parser.add_argument(
        "--write-baseline", metavar="COMMIT", help="record COMMIT's tests as the last GPU run"
    )
    parser.add_argument("--outcomes", type=Path, help="with --write-baseline: the run's JUnit XML or JSON")
    parser.add_argument("--collected", type=Path, help="with --write-baseline: the run's node ids, in order")
    args = parser.parse_args(argv)
    if args.write_baseline:
        if not args.outcomes:
            parser.error("--write-baseline needs --outcomes")
        baseline = write_baseline(args.write_baseline, args.outcomes, args.collected)
        args.baseline.write_text(json.dumps(baseline, indent=1, sort_keys=True) + "\n")
        print(
            f"wrote {args.baseline}: {len(baseline['functions'])} functions, {len(baseline['nodes'])} nodes"
        )
        return 0
    baseline = load_baseline(args.baseline)
    record: dict[str, Any] = {"baseline_commit": baseline.get("commit"), "baseline_found": bool(baseline)}
    try:
        nodes = collect_cuda_nodes()
        chosen = select(nodes, baseline, tree_sources())
    except Exception as error:  # fail soft: say why nothing ran
        record["error"] = f"{type(error).__name__}: {error}"[:2000]
        if args.json:
            args.json.write_text(json.dumps(record, indent=1))
        print(record["error"], file=sys.stderr)
        return 1
    record |= {"cuda_tests": len(nodes), "selected": chosen}
    reasons: dict[str, int] = {}
    for why in chosen.values():
        reasons[why] = reasons.get(why, 0) + 1
    record["reasons"] = reasons
    print(f"{len(chosen)} of {len(nodes)} CUDA tests selected: {reasons}", flush=True)
    if args.list:
        for node, why in chosen.items():
            print(f"  {node}  ({why})")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1))
    if not args.run or not chosen:
        return 0
    work = (args.json.parent if args.json else HERE / "results").resolve()
    record |= run_selected(chosen, work, args.workers)
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
    print(f"changed CUDA tests: {record.get('outcomes')}", flush=True)
    return 0 if record["returncode"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
