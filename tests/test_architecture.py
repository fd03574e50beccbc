"""The package's shape, read from its source: no import cycle, imports only go down the layers.

The import graph is built from the AST of every module of ``torchlns``, including imports
inside functions (a lazy import is still a dependency, and the usual way a cycle hides).
Importing ``a.b.c`` also runs the ``__init__`` of every package on the way, so those count
as edges too (except the importer's own ancestors, which are already importing).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "torchlns"

# Layers from the bottom up: a module may import from its own layer and the ones below.
LAYERS = [
    ("torchlns.core", "torchlns._text", "torchlns._version"),
    ("torchlns.ops",),
    ("torchlns.codec", "torchlns.config"),
    ("torchlns.tensor",),
    ("torchlns.functional", "torchlns.metrics"),
    ("torchlns.nn",),
    ("torchlns.transforms",),
    ("torchlns.deploy",),
    ("torchlns",),  # the public API (the package's __init__)
    ("torchlns.apps",),
    ("torchlns.__main__",),
]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules_of(root: Path) -> Dict[str, Path]:
    return {module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def imports_of(name: str, path: Path, known: Set[str]) -> Set[str]:
    """Every module of ``known`` that importing ``name`` (at any time: lazy imports count) imports."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: Set[str] = set()

    def add(target: str) -> None:
        # The target module itself, or the package that defines the imported name.
        while target and target not in known:
            target = target.rpartition(".")[0]
        if not target:
            return
        found.add(target)
        parent = target.rpartition(".")[0]
        while parent:  # importing a submodule runs its packages' __init__ first
            if parent in known and not (name == parent or name.startswith(parent + ".")):
                found.add(parent)
            parent = parent.rpartition(".")[0]

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
    found.discard(name)
    return found


def import_graph(root: Path) -> Dict[str, Set[str]]:
    mods = modules_of(root)
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def find_cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    cycles: List[List[str]] = []

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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def layer_of(module: str) -> int:
    best, depth = None, -1
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and prefix.count(".") > depth:
                best, depth = rank, prefix.count(".")
    if best is None:
        raise AssertionError(f"{module} belongs to no layer; add it to LAYERS in {Path(__file__).name}")
    return best


# ----------------------------------------------------------------------------------------
# the checks
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph():
    return import_graph(PACKAGE)


def test_the_graph_sees_the_package(graph):
    assert {"torchlns.core.formats", "torchlns.ops.library", "torchlns.functional", "torchlns.nn.swap",
            "torchlns.transforms.convert", "torchlns.apps.cli"} <= set(graph)
    assert "torchlns.core.formats" in graph["torchlns.codec"]
    assert "torchlns.nn" in graph["torchlns.transforms.convert"]  # via torchlns.nn.layers: the package runs first


def test_no_import_cycle(graph):
    assert find_cycles(graph) == []


def test_imports_only_go_down(graph):
    upward = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)]
    assert upward == []


def test_kernels_depend_on_core_and_the_op_library_only(graph):
    allowed = ("torchlns.core", "torchlns.ops")
    bad = [f"{a} -> {b}" for a, targets in graph.items() if a.startswith("torchlns.ops")
           for b in targets if not b.startswith(allowed)]
    assert bad == []


def test_core_is_the_bottom(graph):
    bad = [f"{a} -> {b}" for a, targets in graph.items() if a.startswith("torchlns.core")
           for b in targets if not b.startswith("torchlns.core")]
    assert bad == []


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


# ----------------------------------------------------------------------------------------
# the checker catches what it must
# ----------------------------------------------------------------------------------------
def _write(root: Path, files: Dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root / "torchlns"


def test_a_lazy_import_cycle_is_found(tmp_path):
    pkg = _write(tmp_path, {
        "torchlns/__init__.py": "",
        "torchlns/a.py": "from .b import g\n",
        "torchlns/b.py": "def g():\n    from .a import f  # lazy, inside a function\n    return f\n",
    })
    assert find_cycles(import_graph(pkg)) == [["torchlns.a", "torchlns.b"]]


def test_a_cycle_through_a_package_init_is_found(tmp_path):
    pkg = _write(tmp_path, {
        "torchlns/__init__.py": "",
        "torchlns/low/__init__.py": "from .x import X\n",
        "torchlns/low/x.py": "X = 1\n",
        "torchlns/low/y.py": "from torchlns.high import H\n",
        "torchlns/high.py": "from torchlns.low.x import X\nH = X\n",
    })
    graph = import_graph(pkg)
    assert "torchlns.low" in graph["torchlns.high"]  # importing low.x runs low/__init__
    assert find_cycles(graph) == []
    (pkg / "low" / "__init__.py").write_text("from .x import X\nfrom .y import *\n")
    assert find_cycles(import_graph(pkg)) == [["torchlns.high", "torchlns.low", "torchlns.low.y"]]


def test_an_upward_import_is_flagged(tmp_path):
    pkg = _write(tmp_path, {
        "torchlns/__init__.py": "",
        "torchlns/core/__init__.py": "",
        "torchlns/core/formats.py": "import torchlns.functional\n",
        "torchlns/functional.py": "",
    })
    graph = import_graph(pkg)
    assert [f"{a} -> {b}" for a, t in graph.items() for b in t if layer_of(b) > layer_of(a)] == [
        "torchlns.core.formats -> torchlns.functional"]
