"""The project's modules import one another as a graph without cycles (issue #26: a tree of layers).

An AST walk, nothing is imported: every `import` and `from ... import` of every module of the project's
packages (pyproject's `[tool.setuptools.packages.find] include`), at module level AND inside functions and
methods (an import moved into a function still runs, and hides a cycle from Python's import machinery but not
from the design). Not counted: imports under `if TYPE_CHECKING:` (they never run) and the implicit import of
a module's parent packages (`import a.b.c` runs `a/__init__` and `a/b/__init__`; a package re-exporting its
submodules is not a cycle of the design).

An edge goes to the module the statement names: `from a.b import c` to `a.b.c` when that is a module of the
project, otherwise to `a.b`.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def project_packages() -> list[str]:
    """The top-level packages pyproject.toml ships (`include = ["secure_fedkim*", ...]`)."""
    conf = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = conf["tool"]["setuptools"]["packages"]["find"]["include"]
    names = sorted({pattern.split("*")[0].split(".")[0] for pattern in include})
    assert names and all((ROOT / n / "__init__.py").is_file() for n in names), names
    return names


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in project_packages():
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom node, at any depth, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: line of the first such import}."""
    modules = project_modules()
    graph: dict[str, dict[str, int]] = {m: {} for m in modules}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in _import_nodes(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 more
                    package = module.split(".") if is_package else module.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join(package + ([base] if base else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a non-module name: its module
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph[module].setdefault(target, node.lineno)
    return graph


def knots(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components of more than one module (each module reaches every other: a knot)."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):  # Tarjan, iteratively (no recursion limit on a deep graph)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        work = [(v, iter(sorted(graph[v])))]
        while work:
            node, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.add(w)
                        if w == node:
                            break
                    if len(component) > 1:
                        components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(components, key=min)


def shortest_cycle(graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """A shortest closed path through the component's first module (breadth first, first node repeated last)."""
    start = min(component)
    paths, frontier = {start: [start]}, [start]
    while frontier:
        nxt = []
        for node in frontier:
            for w in sorted(graph[node]):
                if w == start:
                    return paths[node] + [start]
                if w in component and w not in paths:
                    paths[w] = paths[node] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{component} is not strongly connected")


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle per knot."""
    return [shortest_cycle(graph, k) for k in knots(graph)]


def describe(component: set[str], graph: dict[str, dict[str, int]], modules: dict[str, Path]) -> str:
    cycle = shortest_cycle(graph, component)
    steps = [f"{a} ({modules[a].relative_to(ROOT)}:{graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    more = sorted(component - set(cycle))
    also = f"\n  the same knot also holds: {', '.join(more)}" if more else ""
    return "import cycle:\n    " + "\n    ".join(steps) + also


def test_the_walk_sees_function_level_imports_and_the_whole_project():
    graph = import_graph()
    assert {"secure_fedkim", "privacy", "attacks"} <= set(project_packages())
    assert len(graph) > 80
    # imported only inside a function: the walk must still see it
    assert "secure_fedkim.federation.engine" in graph["secure_fedkim.drivers.run"]
    # relative imports resolve
    assert "secure_fedkim.report.collect" in graph["secure_fedkim.report.aggregation"]


def test_a_cycle_is_found_and_named():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {"b": 5}, "e": {}, "f": {"e": 6}}
    assert knots(graph) == [{"a", "b", "c", "d"}]
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    modules = {m: ROOT / f"{m}.py" for m in graph}
    assert describe({"a", "b", "c", "d"}, graph, modules) == (
        "import cycle:\n    a (a.py:1) -> b\n    b (b.py:2) -> c\n    c (c.py:3) -> a\n  the same knot also holds: d")


def test_no_import_cycle_among_the_projects_modules():
    graph, modules = import_graph(), project_modules()
    found = knots(graph)
    assert not found, "\n".join(describe(k, graph, modules) for k in found)


def test_secure_fedkim_keeps_at_most_8_flat_modules():
    """The layout shows the architecture (issue #26): the hospital's side, the run directory and the drivers are
    packages; what stays flat is what every side shares (config, plan, metrics, the CLI)."""
    flat = sorted(p.name for p in (ROOT / "secure_fedkim").glob("*.py"))
    assert len(flat) <= 8, flat
    for package in ("hospital", "rundir", "drivers", "federation", "report", "data", "fm", "deploy"):
        assert (ROOT / "secure_fedkim" / package / "__init__.py").is_file(), package
