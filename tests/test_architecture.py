"""The code's shape stays legible: no import cycles, no folder of more than 15 modules, no file over 450 lines,
no function over 120. These bounds are what make the folders show the architecture (README.md, "Layout");
a change that breaks one should split a module or move a helper, not raise the bound."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "model", "data_prep", "pipeline", "launch")
CODE_DIRS = PACKAGES + ("benchmarks",)
MAX_MODULES_PER_FOLDER, MAX_FILE_LINES, MAX_FUNCTION_LINES = 15, 450, 120


def _python_files(dirs=CODE_DIRS) -> list[Path]:
    return sorted(p for d in dirs for p in (REPO / d).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports, at top level or inside functions (a lazy import still ties
    the two modules together). `from pkg import name` is an edge to pkg.name when that is a module."""
    modules = {_module_name(p): p for p in _python_files(PACKAGES)}
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a package: its deepest module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative DFS: white/grey/black)."""
    colour: dict[str, int] = {}
    for root in sorted(graph):
        if colour.get(root):
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not colour.get(child):
                colour[child] = 1
                stack.append((child, iter(sorted(graph.get(child, ())))))
                path.append(child)
    return None


def test_the_import_graph_has_no_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_planted_cycle_and_the_graph_sees_lazy_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    assert "pipeline.train.trainer" in graph["pipeline.pretrain"]        # a function-level import
    assert "pipeline.runtime.distributed" in graph["pipeline.train.build"]  # `from pipeline.runtime import distributed`


def test_no_folder_holds_more_than_15_modules():
    per_folder = defaultdict(list)
    for path in _python_files():
        if path.name != "__init__.py":
            per_folder[path.parent.relative_to(REPO)].append(path.name)
    crowded = {str(f): len(files) for f, files in per_folder.items() if len(files) > MAX_MODULES_PER_FOLDER}
    assert not crowded, f"folders over {MAX_MODULES_PER_FOLDER} modules (make a subpackage): {crowded}"


def test_no_file_over_450_lines_and_no_function_over_120():
    long_files, long_functions = [], []
    for path in _python_files():
        text = path.read_text()
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(REPO)} ({text.count(chr(10))})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({length})")
    assert not long_files, "files over 450 lines (split by responsibility): " + ", ".join(long_files)
    assert not long_functions, "functions over 120 lines: " + ", ".join(long_functions)
