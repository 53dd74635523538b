"""The package's structure as rules: no import circles, and no module-level state that lives
per request (a scheduler's requests belong to its session)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = {"hybridkv_sglang": ROOT / "hybridkv_sglang", "hybridkv_sglang.kernels": ROOT / "kernels"}

MUTATORS = frozenset(
    {"append", "add", "update", "pop", "popitem", "setdefault", "clear", "extend", "remove"}
)
PROCESS_STATE = {
    "hybridkv_sglang.policy.registry": {"POLICIES"},
    "hybridkv_sglang.runtime.session.current": {"_process"},
    "hybridkv_sglang.runtime.hooks.installation": {"_installed"},
    "hybridkv_sglang.runtime.plugin": {"_registered"},
}
"""Module-level state that is the process's, never a request's: the policies it knows, what it
serves (session or launch config), the hooks it installed, whether the plugin registered."""


def _modules() -> dict[str, tuple[Path, ast.Module]]:
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            found[name] = (path, ast.parse(path.read_text(), str(path)))
    return found


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, but those under ``if TYPE_CHECKING``."""
    skipped = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for stmt in block.body
        for node in ast.walk(stmt)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in skipped
    ]


def _import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, (_, tree) in modules.items():
        for node in _runtime_imports(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif node.level == 0 and node.module:
                targets = [
                    f"{node.module}.{a.name}"
                    if f"{node.module}.{a.name}" in modules
                    else node.module
                    for a in node.names
                ]
            else:
                targets = []
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
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


def test_no_module_imports_itself_back():
    graph = _import_graph()
    assert len(graph) > 40 and sum(map(len, graph.values())) > 100  # the graph was read
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _mutated_module_state(tree: ast.Module) -> set[str]:
    """Module-level names that functions rebind (``global``) or mutate in place."""
    module_names = {
        target.id
        for stmt in tree.body
        if isinstance(stmt, (ast.Assign, ast.AnnAssign))
        for target in (stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target])
        if isinstance(target, ast.Name)
    }
    mutated = set()
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        local = {a.arg for a in ast.walk(func.args) if isinstance(a, ast.arg)}
        for node in ast.walk(func):
            if isinstance(node, ast.Global):
                mutated |= set(node.names)
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                targets = (
                    node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                )
                for target in targets:
                    if isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name):
                        mutated.add(target.value.id)
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in MUTATORS
                and isinstance(node.func.value, ast.Name)
            ):
                mutated.add(node.func.value.id)
        mutated -= local - module_names
    return mutated & module_names


def test_no_module_level_state_but_the_process_own():
    found = {
        name: state
        for name, (_, tree) in _modules().items()
        if (state := _mutated_module_state(tree))
    }
    assert found == PROCESS_STATE


def test_the_state_finder_finds_a_registry_keyed_by_request():
    tree = ast.parse("TABLE = {}\n\ndef add(rid, x):\n    TABLE[rid] = x\n")
    assert _mutated_module_state(tree) == {"TABLE"}
