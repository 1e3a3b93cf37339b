"""peftkit's import graph, read from the source with ``ast``: no cycles, and the layering rules of DESIGN.md.

Every ``import`` and ``from ... import`` counts, at module level or inside a function (peftkit imports
heavy modules lazily, and a lazy import is still a dependency). A module is its dotted path
(``peftkit/tasks/qa.py`` is ``peftkit.tasks.qa``, ``peftkit/tasks/__init__.py`` is ``peftkit.tasks``).
``from peftkit import runs`` imports the module ``peftkit.runs``; ``from peftkit.tasks import get_task``
imports the package, that is its ``__init__``. Relative imports resolve against the importing module's
package. Importing ``peftkit.tasks.qa`` also runs ``peftkit/tasks/__init__.py`` at run time; that edge is
not drawn, or every package whose ``__init__`` imports its own submodules would be a cycle.

The rules are written by layer, so that modules split off later fall under them by name:
- the recipe layer (``peftkit.recipe`` and, if it becomes a package, its submodules) and ``peftkit.errors``
  reach nothing of the training side, the derived-model side or the CLI, not even through other modules;
- ``peftkit.tasks`` and its submodules reach nothing of the training side, the derived side or the CLI;
- no module but ``peftkit.__main__`` reaches ``peftkit.cli``.
"""

from __future__ import annotations

import ast
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import REPO

PACKAGE = "peftkit"

# Layers, by module (or package) name under peftkit.
TRAINING_SIDE = ("training", "lifecycle", "trainer", "evaluation", "sweep", "cv")
DERIVED = ("merge", "combine", "parity", "export", "card")
CLI = ("cli",)
RECIPE_LAYER = ("recipe", "errors")
TASKS = ("tasks",)

Graph = Mapping[str, Iterable[str]]


@dataclass(frozen=True)
class Rule:
    """Modules of ``sources`` (layers; ``()``: every module) must not reach any module of ``forbidden``."""

    name: str
    sources: tuple[str, ...]
    forbidden: tuple[str, ...]
    exempt: tuple[str, ...] = field(default=())


RULES = (
    Rule(
        "the recipe layer and errors import nothing of training, sweep, merge, export or the CLI",
        RECIPE_LAYER,
        (*TRAINING_SIDE, *DERIVED, *CLI),
    ),
    Rule("tasks never import training, merge, export or the CLI", TASKS, (*TRAINING_SIDE, *DERIVED, *CLI)),
    Rule("no library module imports the CLI (only __main__ may)", (), CLI, exempt=("__main__", *CLI)),
)


def in_layer(module: str, layers: Iterable[str], package: str = PACKAGE) -> bool:
    """Whether ``module`` is one of ``layers`` (``package.<layer>``) or a submodule of one."""
    for layer in layers:
        name = f"{package}.{layer}"
        if module == name or module.startswith(name + "."):
            return True
    return False


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file of the package at ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def resolve(name: str, modules: Iterable[str]) -> str | None:
    """The longest known module that ``name`` is or lies inside (a name from a module resolves to it)."""
    known = set(modules)
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def imports_of(module: str, path: Path, modules: Iterable[str]) -> set[str]:
    """The package's modules that ``module`` (the file at ``path``) imports, anywhere in its body."""
    known = set(modules)
    package_parts = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = resolve(alias.name, known)
                if target:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                # `from pkg import sub` imports the module pkg.sub when there is one, else a name of pkg.
                target = resolve(f"{base}.{alias.name}", known) if alias.name != "*" else None
                if target is None or target != f"{base}.{alias.name}":
                    target = resolve(base, known)
                if target:
                    found.add(target)
    found.discard(module)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module → the package's modules it imports, for the package at ``root``."""
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def shortest_path(graph: Graph, start: str, goal: set[str]) -> list[str] | None:
    """The shortest import chain from ``start`` to a module of ``goal`` (``start`` itself excluded)."""
    previous: dict[str, str] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if nxt in goal:
                path = [nxt, node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                return path[::-1]
            if nxt not in seen:
                seen.add(nxt)
                previous[nxt] = node
                queue.append(nxt)
    return None


def find_cycles(graph: Graph) -> list[list[str]]:
    """One cycle per strongly connected component that has one, as a path ``a → ... → a``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    nodes = sorted(set(graph) | {n for targets in graph.values() for n in targets})

    def visit(root: str) -> None:  # Tarjan's algorithm, iterative (no recursion limit)
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))

    for node in nodes:
        if node not in index:
            visit(node)
    cycles = []
    for component in components:
        first = component[0]
        if len(component) > 1 or first in set(graph.get(first, ())):
            members = set(component)
            inside = {n: [t for t in graph.get(n, ()) if t in members] for n in component}
            path = shortest_path(inside, first, {first})
            assert path is not None
            cycles.append(path)
    return sorted(cycles)


def rule_violations(graph: Graph, rules: Iterable[Rule], package: str = PACKAGE) -> list[str]:
    """Each source module that reaches a forbidden module, with the import chain that reaches it."""
    problems = []
    modules = sorted(graph)
    for rule in rules:
        forbidden = {m for m in modules if in_layer(m, rule.forbidden, package)}
        forbidden |= {t for m in modules for t in graph[m] if in_layer(t, rule.forbidden, package)}
        for module in modules:
            if rule.sources and not in_layer(module, rule.sources, package):
                continue
            if in_layer(module, rule.exempt, package) or module in forbidden:
                continue
            path = shortest_path(graph, module, forbidden)
            if path:
                problems.append(f"{rule.name}: {' -> '.join(path)}")
    return problems


def describe(cycles: list[list[str]], violations: list[str]) -> str:
    lines = [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles]
    return "\n".join(lines + [f"rule broken: {v}" for v in violations])


# ---------------------------------------------------------------------------------------------------------
# peftkit itself


def test_peftkit_import_graph_has_no_cycles_and_keeps_its_layers() -> None:
    graph = import_graph(REPO / PACKAGE)
    # The graph is really read: these edges exist in any layout DESIGN.md allows.
    assert {"peftkit.recipe", "peftkit.errors", "peftkit.cli", "peftkit.tasks"} <= set(graph)
    assert "peftkit.cli" in graph["peftkit.__main__"]
    assert sum(len(targets) for targets in graph.values()) > 40
    cycles = find_cycles(graph)
    violations = rule_violations(graph, RULES)
    assert not cycles and not violations, describe(cycles, violations)


# ---------------------------------------------------------------------------------------------------------
# the checker, on graphs whose answer is known


def test_checker_reports_a_cycle_with_its_path() -> None:
    graph = {
        "peftkit.errors": set(),
        "peftkit.a": {"peftkit.b", "peftkit.errors"},
        "peftkit.b": {"peftkit.c"},
        "peftkit.c": {"peftkit.a"},
        "peftkit.d": {"peftkit.d"},
        "peftkit.e": {"peftkit.a"},
    }
    assert find_cycles(graph) == [
        ["peftkit.a", "peftkit.b", "peftkit.c", "peftkit.a"],
        ["peftkit.d", "peftkit.d"],
    ]
    assert find_cycles({"peftkit.a": {"peftkit.b"}, "peftkit.b": set()}) == []
    message = describe(find_cycles(graph), [])
    assert "import cycle: peftkit.a -> peftkit.b -> peftkit.c -> peftkit.a" in message


def test_checker_reports_a_rule_broken_through_another_module() -> None:
    graph = {
        "peftkit.recipe": {"peftkit.errors", "peftkit.sweep_schema"},
        "peftkit.sweep_schema": {"peftkit.lifecycle"},  # a layer module named only in the rules
        "peftkit.lifecycle": {"peftkit.errors"},
        "peftkit.errors": set(),
        "peftkit.tasks": {"peftkit.tasks.qa"},
        "peftkit.tasks.qa": {"peftkit.card"},
        "peftkit.card": set(),
        "peftkit.runs": {"peftkit.cli"},
        "peftkit.cli": {"peftkit.recipe"},
        "peftkit.__main__": {"peftkit.cli"},
    }
    assert rule_violations(graph, RULES) == [
        f"{RULES[0].name}: peftkit.recipe -> peftkit.sweep_schema -> peftkit.lifecycle",
        f"{RULES[1].name}: peftkit.tasks -> peftkit.tasks.qa -> peftkit.card",
        f"{RULES[1].name}: peftkit.tasks.qa -> peftkit.card",
        f"{RULES[2].name}: peftkit.runs -> peftkit.cli",
    ]
    clean = {**graph, "peftkit.sweep_schema": set(), "peftkit.tasks.qa": set(), "peftkit.runs": set()}
    assert rule_violations(clean, RULES) == []
    # A recipe package's submodules are the recipe layer too.
    assert rule_violations({"peftkit.recipe.sweep": {"peftkit.sweep"}, "peftkit.sweep": set()}, RULES) == [
        f"{RULES[0].name}: peftkit.recipe.sweep -> peftkit.sweep"
    ]


def test_checker_reads_every_kind_of_import(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "import pkg.b\n\ndef lazy():\n    from pkg.sub import deep\n",
        "b.py": "from pkg import c\nfrom pkg.sub import helper_name\n",
        "c.py": "import os\nfrom . import d\n",
        "d.py": "from .sub.deep import thing as other\n",
        "sub/__init__.py": "from .deep import thing\n",
        "sub/deep.py": "class K:\n    def m(self):\n        import pkg.a as a\n        from ..d import x\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    assert import_graph(root) == {
        "pkg": set(),
        "pkg.a": {"pkg.b", "pkg.sub.deep"},
        "pkg.b": {"pkg.c", "pkg.sub"},
        "pkg.c": {"pkg.d"},
        "pkg.d": {"pkg.sub.deep"},
        "pkg.sub": {"pkg.sub.deep"},
        "pkg.sub.deep": {"pkg.a", "pkg.d"},
    }
    # one component (a, b, c, d, sub, sub.deep), reported by its shortest cycle through its first module
    assert find_cycles(import_graph(root)) == [["pkg.a", "pkg.sub.deep", "pkg.a"]]
