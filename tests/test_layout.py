"""The package's import graph, read with ``ast`` (imports inside functions included): no module
imports itself back through others, no folder depends on one that depends on it, and the layers
hold: pipeline/ (data) below model/ below train/ and generate/ below evaluate/, the commands/ and
cli.py."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "disco"
NOT_PACKAGE = {"tests", "benchmarks", "build", "demo-output"}


def _modules(root: Path = ROOT) -> dict[str, Path]:
    found = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if parts[0] in NOT_PACKAGE or any(p.startswith(".") for p in parts):
            continue
        name = ".".join((PACKAGE, *path.relative_to(root).with_suffix("").parts))
        found[name.removesuffix(".__init__")] = path
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its body."""
    modules = _modules(root)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in targets:
                if target == PACKAGE or target.startswith(PACKAGE + "."):
                    found = owner(target)
                    if found and found != module:
                        graph[module].add(found)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def folder(module: str) -> str:
    """The top-level folder (or module: cli) of a module; "" for the package itself."""
    return module.split(".")[1] if "." in module else ""


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
    (tmp_path / "a.py").write_text("from disco.b import x\n")
    (tmp_path / "b.py").write_text("def x():\n    from disco import a\n")
    (tmp_path / "c.py").write_text("import disco.a\n")
    graph = import_graph(tmp_path)
    assert graph["disco.b"] == {"disco.a"} and graph["disco.c"] == {"disco.a"}
    assert cycles(graph) == [["disco.a", "disco.b"]]


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert len(graph) > 50 and "disco.pipeline.run" in graph["disco.commands.preprocess"]
    assert {f"disco.commands.{group}" for group in ("preprocess", "train", "generate", "evaluate")} <= graph["disco.cli"]
    assert cycles(graph) == []


@pytest.mark.parametrize("lower", ["pipeline", "model"])
def test_the_lower_folders_import_nothing_above_them(lower):
    above = {"train", "generate", "evaluate", "commands", "cli"} | ({"model"} if lower == "pipeline" else set())
    graph = import_graph()
    wrong = {(m, t) for m, ts in graph.items() if folder(m) == lower for t in ts if folder(t) in above}
    assert not wrong


def test_no_two_folders_import_each_other():
    graph = import_graph()
    folders = {(folder(m), folder(t)) for m, ts in graph.items() for t in ts}
    folders = {(a, b) for a, b in folders if a != b}
    both = {(a, b) for a, b in folders if (b, a) in folders}
    assert not both


def test_train_and_generate_share_model_and_not_each_other():
    graph = import_graph()
    across = {(m, t) for m, ts in graph.items() for t in ts
              if {folder(m), folder(t)} == {"train", "generate"}}
    assert not across
    # One checkpoint format below both: the trainer writes and resumes, generation loads.
    assert "disco.model.checkpoint" in graph["disco.train.loop"] and "disco.model.checkpoint" in graph["disco.generate.run"]
    # The conditioning and the DDIM loop that both use live in model/.
    assert "disco.model.conditioning" in graph["disco.train.inputs"] and "disco.model.pipeline" in graph["disco.train.sampling"]
    assert {"disco.model.conditioning", "disco.model.pipeline"} <= graph["disco.generate.run"]


def test_training_joins_ray_without_importing_the_preprocessing_job():
    graph = import_graph()
    assert "disco.pipeline.cluster" in graph["disco.train.launch"]
    assert not {m for m, ts in graph.items() if folder(m) == "train" and "disco.pipeline.run" in ts}


def test_python_m_disco_is_the_command():
    """A `ray job submit` entrypoint runs with the PATH of the head's `ray start`: `python -m
    disco` (that environment's python) runs the command where `disco-cli` is not on it."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "disco", "train", "--output", "x", "--resume", "--dry-run",
                             "--batch-size", "0"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
