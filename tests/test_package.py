"""The installed package holds what the workflow runs, and nothing reads a checkout: no import circle, no
benchmark code (benchmarks/ imports the package, never the other way), and the recipe's defaults shipped as
package data, so a wheel installed anywhere runs its command-line tools."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml
from helpers import ROOT

PACKAGE = ROOT / "searchr1"


def _in_type_checking(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """``{module: modules of ``package`` it imports}`` for every .py file under ``root`` (the package's folder),
    imports inside functions included (they run too), those under ``if TYPE_CHECKING:`` left out (they never run)."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        is_pkg = path.name == "__init__.py"
        deps: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_pkg else 0)]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            if _in_type_checking(node, parents):
                continue
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a name inside a module
                    target = target.rpartition(".")[0]
                if target and target.split(".")[0] == package and target != name:
                    deps.add(target)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circle():
    graph = import_graph(PACKAGE, "searchr1")
    assert (
        "searchr1.retrieval.server" in graph
        and "searchr1.retrieval.guarded_protocol" in graph["searchr1.retrieval.server"]
    )
    assert cycles(graph) == []


def test_the_circle_detector_finds_the_old_benchmark_circle(tmp_path):
    """bench.py and gpubench.py imported each other (inside functions) when they were in the package."""
    pkg = tmp_path / "searchr1" / "retrieval"
    pkg.mkdir(parents=True)
    (tmp_path / "searchr1" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "bench.py").write_text("def f():\n    from searchr1.retrieval.gpubench import g\n")
    (pkg / "gpubench.py").write_text("def g():\n    from searchr1.retrieval.bench import h\n")
    (pkg / "server.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .bench import f\n"
    )  # typing only: no edge
    graph = import_graph(tmp_path / "searchr1", "searchr1")
    assert graph["searchr1.retrieval.server"] == set()
    assert cycles(graph) == [["searchr1.retrieval.bench", "searchr1.retrieval.gpubench"]]


def test_no_package_module_imports_the_benchmarks():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] == "benchmarks"]
    assert offenders == []
    assert not {"bench.py", "gpubench.py", "peer.py"} & {p.name for p in (PACKAGE / "retrieval").iterdir()}


def test_the_packaged_defaults_are_the_root_configs():
    """One source of truth: searchr1/defaults/ links to the files the Snakefile reads and users edit."""
    for name in ("config.yaml", "config.toy.yaml"):
        packaged = PACKAGE / "defaults" / name
        assert packaged.resolve() == (ROOT / name).resolve(), f"{packaged} must be a link to {name}"


def _build_wheel(tmp_path: Path) -> Path:
    """A wheel built from a copy of what the build reads (links kept as links), so the checkout gets no build/."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "config.yaml", "config.toy.yaml"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "searchr1", symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "dist"
    build = f"from setuptools import build_meta; print(build_meta.build_wheel({str(out)!r}))"
    res = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / res.stdout.strip().splitlines()[-1]


# Slow tier: a wheel build and four interpreters importing torch (~30 s on 2 cores).
@pytest.mark.slow
def test_the_wheel_holds_the_defaults_and_not_the_benchmarks_and_runs_outside_a_checkout(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    assert {"searchr1/defaults/config.yaml", "searchr1/defaults/config.toy.yaml"} <= set(names)
    assert "searchr1/schema/config.schema.yaml" in names
    assert not [n for n in names if n.startswith(("benchmarks/", "tests/", "scripts/"))]
    assert not [n for n in names if Path(n).name in ("bench.py", "gpubench.py", "peer.py")]
    with zipfile.ZipFile(wheel) as z:
        assert z.read("searchr1/defaults/config.yaml") == (ROOT / "config.yaml").read_bytes()
        z.extractall(tmp_path / "site")

    # The installed package alone, run from a directory with no checkout in it or above it.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True)

    where = run("-c", "import searchr1; print(searchr1.__file__)")
    assert where.stdout.startswith(str(tmp_path / "site")), where.stdout + where.stderr
    cfg = run("-m", "searchr1.cli", "config")
    assert cfg.returncode == 0, cfg.stderr
    assert (
        yaml.safe_load(cfg.stdout)["retriever"]["topk_max"]
        == yaml.safe_load((ROOT / "config.yaml").read_text())["retriever"]["topk_max"]
    )
    for args in (("searchr1.retrieval", "serve", "--help"), ("searchr1.toy", "world", "--help")):
        res = run("-m", *args)
        assert res.returncode == 0, (args, res.stderr[-2000:])
