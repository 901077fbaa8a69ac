"""The layout as a test: optkit's imports (read with ast, nothing imported) form no circle and never go
against the layer order below, which is the one place that order is declared.

A module may import modules of its own layer or of a lower one. Imports inside functions count too (a
lazy import still reaches), and so do module names spelled as strings (``import_module("optkit.x")``,
``"optkit.x:fn"``): a string must not hide a reach the layer order forbids.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "optkit"

# Lowest first. conf/ -> config -> bench (runner -> point) -> models + train + opt (-> kernels) -> measure ->
# results -> report / regress is the flow of data; imports point the other way, from who uses to what is used.
LAYERS: List[List[str]] = [
    ["optkit.kernels"],  # torch + triton only
    ["optkit.families", "optkit.data", "optkit.measure"],
    ["optkit.models", "optkit.train"],
    ["optkit.config"],  # the schema takes its choice lists from the modules that implement them
    ["optkit.opt"],  # the patcher, each optimization, the registry
    ["optkit.results"],
    ["optkit.bench", "optkit.report", "optkit.regress"],
    ["optkit.cli", "optkit.__main__", "optkit"],
]
MODULE_STRING = re.compile(r"^(optkit(?:\.[A-Za-z_][A-Za-z0-9_]*)+)\.?(?::[A-Za-z_][A-Za-z0-9_]*)?$")
MAX_LINES, MAX_KERNEL_LINES = (
    420,
    600,
)  # "about 400" (STYLE.md); a kernel file holds kernels, launcher, op and reference
HYDRA_USERS = ("optkit.config", "optkit.bench.runner")  # Hydra appears only in config and runner code
THIRD_PARTY_OF_KERNELS = {"torch", "triton"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: Dict[str, Path] = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best


def _resolve(name: str) -> Optional[str]:
    """The optkit module ``name`` refers to (a submodule, else the longest module prefix)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _string_targets(node: ast.AST) -> Iterator[str]:
    """Module names spelled as strings: "optkit.x", "optkit.x:fn", f"optkit.x.{op}" (its constant prefix)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        text = node.value
    elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        text = str(node.values[0].value)
    else:
        return
    match = MODULE_STRING.match(text)
    if match:
        yield match.group(1)


def imports_of(module: str) -> Set[str]:
    """Every optkit module ``module`` imports, at any depth of its code."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(tree):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else [])
                )
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        elif isinstance(node, (ast.Constant, ast.JoinedStr)):
            names = list(_string_targets(node))
        for name in names:
            target = _resolve(name) if name.startswith("optkit") else None
            if target is not None and target != module:
                found.add(target)
    return found


GRAPH: Dict[str, Set[str]] = {m: imports_of(m) for m in MODULES}


def third_party_imports(module: str) -> Set[str]:
    tree = ast.parse(MODULES[module].read_text())
    tops = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            tops |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            tops.add(node.module.split(".")[0])
    return tops - {"optkit", "__future__"}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_goes_up_the_layers():
    upward = [
        f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
        for m, targets in sorted(GRAPH.items())
        for t in sorted(targets)
        if layer_of(t) > layer_of(m)
    ]
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def _find_cycle() -> Optional[List[str]]:
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def test_no_import_circle():
    cycle = _find_cycle()
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_kernels_import_only_torch_and_triton():
    for module in MODULES:
        if layer_of(module) == 0:
            extra = (
                third_party_imports(module)
                - THIRD_PARTY_OF_KERNELS
                - {"functools", "math", "typing", "dataclasses", "importlib", "os", "collections"}
            )
            assert not extra, f"{module} imports {sorted(extra)}: a kernel file needs torch and triton only"


def test_hydra_only_in_config_and_runner():
    users = [m for m in MODULES if {"hydra"} & third_party_imports(m)]
    assert all(m.startswith(HYDRA_USERS) for m in users), users


@pytest.mark.parametrize("folder", ["optkit", "scripts", "suites", "examples"])
def test_nothing_imports_the_tests(folder):
    for path in (ROOT / folder).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n == "tests" or n.startswith("tests.") for n in names), f"{path} imports tests/"


def test_at_most_six_top_level_modules_and_no_long_files():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 6, top

    def limit(path: Path) -> int:
        return MAX_KERNEL_LINES if module_name(path).startswith("optkit.kernels.") else MAX_LINES

    long = [
        f"{p.relative_to(ROOT)}: {n}"
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > limit(p)
    ]
    assert not long, long


def test_the_checker_sees_what_it_guards():
    """The walker finds function-level and string imports (so the tests above can fail)."""
    assert "optkit.opt.patcher" in GRAPH["optkit"]  # optkit/__init__.py imports it lazily, by string
    assert "optkit.measure.intervals" in GRAPH["optkit.measure.device_trace"]
    low, high = "optkit.kernels.rms_norm", "optkit.bench.runner"
    assert layer_of(high) > layer_of(low) and high not in GRAPH[low] and low not in GRAPH[high]
    GRAPH[low].add(high)
    GRAPH[high].add(low)
    try:
        assert _find_cycle() is not None
    finally:
        GRAPH[low].discard(high)
        GRAPH[high].discard(low)
