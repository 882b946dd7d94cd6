"""The package's import graph: no cycle, no upward import, the project's modules imported at
module level (so the graph in docs/ARCHITECTURE.md is the real one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "affeq_rt"

# Low to high; a module may import from its own layer or any lower one (docs/ARCHITECTURE.md).
LAYERS: list[tuple[str, ...]] = [
    ("affeq_rt.errors", "affeq_rt._version", "affeq_rt.progress", "affeq_rt._core",
     "affeq_rt._core_cuda"),
    ("affeq_rt.io",),
    ("affeq_rt.engine",),
    ("affeq_rt.registry",),
    ("affeq_rt.core",),
    ("affeq_rt.data",),
    ("affeq_rt.model",),
    ("affeq_rt.onnx",),
    ("affeq_rt.method",),
    ("affeq_rt.cluster",),
    ("affeq_rt.vis",),
    ("affeq_rt.report",),
    ("affeq_rt.deploy",),
    ("affeq_rt.demo",),
    ("affeq_rt.cli",),
    ("affeq_rt", "affeq_rt.__main__"),
]
# Imports that stay inside functions on purpose: modules that need an optional extra at import
# time (the compiled CUDA module, absent on CPU builds; the KServe runtime, the `serve` extra).
LAZY_OK = {"affeq_rt._core_cuda", "affeq_rt.deploy.oip_runtime"}
# Command modules import the library inside the functions that use it: the command line builds
# every command's --help from the signatures alone, and a command loads only what it runs
# (issue 25: --help under 0.5 s, predict without the rest). The edges still count above.
LAZY_IMPORTERS = ("affeq_rt.cli.",)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(mod: str) -> int:
    best, best_len = None, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            if (mod == name or mod.startswith(name + ".")) and len(name) > best_len:
                best, best_len = i, len(name)
    assert best is not None, f"{mod} is in no layer: add it to LAYERS and ARCHITECTURE.md"
    return best


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    """Absolute names a ``from … import …`` refers to (submodules included where they exist)."""
    if node.level:
        base = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [target]
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).is_file() or \
                (PACKAGE.parent / sub.replace(".", "/") / "__init__.py").is_file():
            names.append(sub)
    return names


def collect() -> tuple[dict[str, set[str]], list[str]]:
    """Import graph of affeq_rt (function-local and TYPE_CHECKING imports included: a cycle
    through them is still a cycle in the design), and the function-local imports of our own
    modules."""
    graph: dict[str, set[str]] = {}
    lazy: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        deps: set[str] = set()
        top_level = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = resolve(mod, path.name == "__init__.py", node)
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            ours = [t for t in targets if t.startswith("affeq_rt.")] or \
                [t for t in targets if t == "affeq_rt"]
            if not ours:
                continue
            # an import under `if TYPE_CHECKING:` is still a dependency of the design: it counts
            # for cycles and layers, and is not a lazy import
            if id(node) not in top_level and not _in_module_block(tree, node) \
                    and not mod.startswith(LAZY_IMPORTERS):
                lazy.extend(f"{mod} -> {t}" for t in ours if t not in LAZY_OK)
            deps.update(ours)
        graph[mod] = deps
    return graph, lazy


def _in_module_block(tree: ast.Module, node: ast.AST) -> bool:
    """True for an import inside a module-level ``if``/``try`` block."""
    for top in tree.body:
        if isinstance(top, (ast.If, ast.Try)) and any(n is node for n in ast.walk(top)):
            return True
    return False


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle among the package's modules (importing a package runs its __init__)."""
    def edges(m: str) -> set[str]:
        out = set()
        for t in graph.get(m, ()):
            parts = t.split(".")
            # importing a.b.c runs a.b's __init__ too; ignore the root package's own __init__
            for i in range(2, len(parts) + 1):
                p = ".".join(parts[:i])
                # a submodule's own parent packages are initialised before it anyway (a
                # package __init__ re-exporting its submodules is not a cycle)
                if p in graph and p != m and not m.startswith(p + "."):
                    out.add(p)
        return out

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges(m)):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle() -> None:
    graph, _ = collect()
    assert len(graph) > 30  # the walk really saw the package
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_upward_import() -> None:
    graph, _ = collect()
    upward = [f"{m} -> {t}" for m, deps in graph.items() for t in deps
              if t != "affeq_rt" and layer_of(t) > layer_of(m)]
    assert not upward, "imports from a higher layer: " + "; ".join(sorted(upward))


def test_own_modules_imported_at_module_level() -> None:
    _, lazy = collect()
    assert not lazy, "function-local imports of affeq_rt modules: " + "; ".join(sorted(lazy))


@pytest.mark.parametrize(("graph", "cyclic"), [
    ({"affeq_rt.a": {"affeq_rt.b"}, "affeq_rt.b": {"affeq_rt.a"}}, True),
    ({"affeq_rt.a": {"affeq_rt.b"}, "affeq_rt.b": set()}, False),
    ({"affeq_rt.p": set(), "affeq_rt.p.x": {"affeq_rt.q.y"}, "affeq_rt.q": set(),
      "affeq_rt.q.y": {"affeq_rt.p.z"}, "affeq_rt.p.z": set()}, False),
    ({"affeq_rt.p": {"affeq_rt.p.x"}, "affeq_rt.p.x": {"affeq_rt.q.y"}, "affeq_rt.q": set(),
      "affeq_rt.q.y": {"affeq_rt.p.z"}, "affeq_rt.p.z": set()}, True),
    ({"affeq_rt.p": {"affeq_rt.p.x"}, "affeq_rt.p.x": {"affeq_rt.p.z"}, "affeq_rt.p.z": set()},
     False),
])
def test_cycle_finder_itself(graph: dict[str, set[str]], cyclic: bool) -> None:
    """The checker must see a cycle where one is (including through a package __init__)."""
    assert (find_cycle(graph) is not None) == cyclic
