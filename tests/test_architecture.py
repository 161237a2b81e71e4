"""The package's structure, read from every import statement (those inside functions too).

`lint-imports` (run by `make lint`, so by `make test`; contracts in pyproject.toml) holds the layers;
these tests hold what its contracts cannot say: no import cycle at all, no module importing the package
face, no module of the package imported inside a function but the compiled kernels' (the rest of a
module's dependencies stand at its top, where a reader sees them), few modules at the package root, and
benchmarks that do not reach into the tests.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastpix2pix"

# The modules that need the compiled library: importing them raises without it, and the reference ops
# must still work, so they are imported where the fused ops are chosen.
LIBRARY_GATED = {"fastpix2pix.ops.fused", "fastpix2pix.ops.kernels"}
# Packages a user may not have installed (the extras), imported where they are used.
OPTIONAL_PACKAGES = {"onnx", "onnxruntime", "onnxscript", "openvino", "torch.utils.tensorboard"}
# Imported where used for their cost: matplotlib takes a large part of a second to import, and only the
# loss curve needs it.
IMPORT_COST = {"matplotlib"}
# The standalone runner of exported files needs none of its imports but numpy and the one runtime used.
STANDALONE = {"fastpix2pix.deploy"}
MAX_ROOT_MODULES = 8


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> Iterator[tuple[ast.stmt, str, bool]]:
    """(statement, imported module, inside a function) for every import statement in ``path``.

    ``from a import b`` counts as an import of ``a.b`` when that is a module of the package, else of ``a``.
    """
    tree = ast.parse(path.read_text())
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    for node in ast.walk(tree):
        inner = id(node) in in_function
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node, alias.name, inner
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield node, candidate if candidate in MODULES else base, inner


def package_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for _, target, _ in imports_of(path):
            if target in modules and target != name:
                graph[name].add(target)
    return graph


def find_cycle(graph: Mapping[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that ends where it starts, or None (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_cycle_and_passes_a_tree() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_imports_at_the_top_and_inside_functions() -> None:
    graph = package_graph(MODULES)
    assert "fastpix2pix.training.step" in graph["fastpix2pix.training.trainer"]
    nested = [t for _, t, inner in imports_of(PACKAGE / "ops" / "selfcheck.py") if inner]
    assert "fastpix2pix.ops.kernels" in nested


def test_no_import_cycle_in_the_package() -> None:
    cycle = find_cycle(package_graph(MODULES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_the_package_face() -> None:
    offenders = [
        f"{name}: line {node.lineno}"
        for name, path in MODULES.items()
        if name != "fastpix2pix"
        for node, target, _ in imports_of(path)
        if target == "fastpix2pix"
    ]
    assert not offenders, f"these import fastpix2pix/__init__.py (import the defining module): {offenders}"


def test_no_package_module_imported_inside_a_function_but_the_kernels() -> None:
    offenders = [
        f"{name}:{node.lineno} imports {target} inside a function"
        for name, path in MODULES.items()
        for node, target, inner in imports_of(path)
        if inner and target.split(".")[0] == "fastpix2pix" and target not in LIBRARY_GATED
    ]
    assert not offenders, "\n".join(offenders)


def test_imports_inside_functions_are_only_for_optional_packages() -> None:
    """The rest of a module's dependencies stand at its top, where a reader sees them."""
    offenders = []
    for name, path in MODULES.items():
        if name in STANDALONE:
            continue
        for node, target, inner in imports_of(path):
            allowed = target in LIBRARY_GATED or any(
                target == p or target.startswith(p + ".") for p in OPTIONAL_PACKAGES | IMPORT_COST
            )
            if inner and not allowed:
                offenders.append(f"{name}:{node.lineno} imports {target} inside a function")
    assert not offenders, "\n".join(offenders)


def test_few_modules_at_the_package_root() -> None:
    root_modules = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root_modules) <= MAX_ROOT_MODULES, root_modules


def test_benchmarks_do_not_import_the_tests() -> None:
    offenders = []
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            if any(n == "tests" or n.startswith(("tests.", "test_")) for n in names):
                offenders.append(f"{path.name}:{node.lineno}")
        if any("sys.path" in line and "tests" in line for line in text.splitlines()):
            offenders.append(f"{path.name}: puts the tests on sys.path")
    assert not offenders, offenders
