"""The architecture of docs/design (README "Architecture"), checked from the sources:

1. the import graph of ``src/slope_lightning`` and ``kernels/slope_kernels`` has no cycle;
2. ``import slope_lightning.sparse`` (and ``from slope_lightning import sparsify``) loads
   neither Lightning nor the baselines;
3. every module belongs to a layer named in :data:`LAYERS` (there is no "everything else"
   layer), and every layer imports only its own and the layers below it: kernels -> utils ->
   sparse -> baselines -> models -> model files -> data -> checkpoints -> callbacks' shared
   modules -> callbacks -> module -> entry points;
4. no callback file imports another: a file of ``callbacks/`` imports only
   ``callbacks.shared`` and ``callbacks.lightning_internals`` of its package.

The graph is built with ``ast`` from the files, not by importing them, so it sees imports
inside functions too (a function-level import hides a cycle from Python, not from a reader).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PACKAGES = (ROOT / "src" / "slope_lightning", ROOT / "kernels" / "slope_kernels")
OURS = ("slope_lightning", "slope_kernels")


@dataclass(frozen=True)
class Edge:
    """``source`` imports ``target`` at ``path``:``line``."""

    source: str
    target: str
    path: Path
    line: int

    def __str__(self) -> str:
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{self.source} -> {self.target} ({where}:{self.line})"


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` under a package directory."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = path.relative_to(package_dir.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` / ``if typing.TYPE_CHECKING:``: imports that never run."""
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _ImportCollector(ast.NodeVisitor):
    """Every import statement of a module (module level, in functions, in classes), except
    those under ``if TYPE_CHECKING:``, as (imported name, line, names imported from it)."""

    def __init__(self) -> None:
        self.found: list[tuple[int, str, int, tuple[str, ...]]] = []  # (level, module, line, names)

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self.found.append((0, alias.name, node.lineno, ()))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        names = tuple(alias.name for alias in node.names)
        self.found.append((node.level, node.module or "", node.lineno, names))


def imports_of(module: str, path: Path, known: set[str]) -> tuple[list[Edge], set[str]]:
    """The internal edges of one module, and the top-level names of what else it imports.

    ``import a.b`` depends on ``a.b``; ``from a import b`` on ``a.b`` when that is a module
    (a submodule import), else on ``a``. Relative imports are resolved against the module's
    package. Parent packages that Python initialises on the way are not edges: every module
    would otherwise depend on its own package's ``__init__``.
    """
    collector = _ImportCollector()
    collector.visit(ast.parse(path.read_text(), filename=str(path)))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    edges, external = [], set()
    for level, name, line, names in collector.found:
        if level:
            base = package.split(".")
            base = base[: len(base) - (level - 1)]
            name = ".".join([*base, name] if name else base)
        targets = [name]
        if names:
            submodules = [f"{name}.{n}" for n in names if f"{name}.{n}" in known]
            targets = submodules + ([name] if len(submodules) < len(names) else [])
        for target in targets:
            if target.split(".")[0] in OURS:
                edges.append(Edge(module, target, path, line))
            else:
                external.add(target.split(".")[0])
    return edges, external


def import_graph(package_dirs: tuple[Path, ...] = PACKAGES) -> tuple[list[Edge], dict[str, set]]:
    """All internal import edges of the packages, and each module's external top-level names."""
    files: dict[str, Path] = {}
    for directory in package_dirs:
        files |= module_files(directory)
    edges: list[Edge] = []
    external: dict[str, set[str]] = {}
    for module, path in files.items():
        found, outside = imports_of(module, path, set(files))
        edges += [e for e in found if e.target != module]
        external[module] = outside
    return edges, external


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle (as its edges, in order) for every strongly connected component that has one
    (Tarjan's algorithm, then a shortest path back to the start inside the component)."""
    graph: dict[str, list[Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, []).append(edge)
        graph.setdefault(edge.target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for edge in graph[node]:
            if edge.target not in index:
                connect(edge.target)
                low[node] = min(low[node], low[edge.target])
            elif edge.target in on_stack:
                low[node] = min(low[node], index[edge.target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for node in sorted(graph):
            if node not in index:
                connect(node)
    finally:
        sys.setrecursionlimit(limit)

    cycles = []
    for component in components:
        start = min(component)
        # Breadth-first from start, inside the component, back to start.
        paths: dict[str, list[Edge]] = {start: []}
        frontier = [start]
        cycle: list[Edge] | None = None
        while frontier and cycle is None:
            following = []
            for node in frontier:
                for edge in sorted(graph[node], key=lambda e: e.target):
                    if edge.target not in component:
                        continue
                    if edge.target == start:
                        cycle = [*paths[node], edge]
                        break
                    if edge.target not in paths:
                        paths[edge.target] = [*paths[node], edge]
                        following.append(edge.target)
                if cycle is not None:
                    break
            frontier = following
        assert cycle is not None
        cycles.append(cycle)
    return cycles


def describe(cycle: list[Edge]) -> str:
    chain = " -> ".join([cycle[0].source, *(edge.target for edge in cycle)])
    return chain + "\n" + "\n".join(f"    {edge}" for edge in cycle)


# ------------------------------------------------------------------ the layers of the design

#: Lowest first. A module may import its own layer and the layers below it, never above.
#: ``pkg.*`` is a package and everything in it; a name without ``.*`` is that module only.
#: Every module is named here (the most specific pattern wins); a new one must be placed.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("kernels", ("slope_kernels.*",)),
    ("utils", ("slope_lightning.utils",)),
    # The method; the package's root re-exports its torch-only API (Lightning lazily).
    ("sparse", ("slope_lightning.sparse.*", "slope_lightning")),
    ("baselines", ("slope_lightning.baselines.*",)),
    ("models", ("slope_lightning.models.*",)),
    # Model files in and out, and the optimizer: torch only.
    ("model files", ("slope_lightning.export", "slope_lightning.hf", "slope_lightning.optim")),
    # The first layer that may import Lightning (the data module does).
    ("data", ("slope_lightning.data.*",)),
    ("checkpoints", ("slope_lightning.checkpoints",)),
    # What the callbacks share: their coordination types and Lightning's internals.
    (
        "callbacks shared",
        ("slope_lightning.callbacks.shared", "slope_lightning.callbacks.lightning_internals"),
    ),
    # One file per callback, and the deprecated aliases of their old homes.
    (
        "callbacks",
        (
            "slope_lightning.callbacks.*",
            "slope_lightning.faults",
            "slope_lightning.method_callbacks",
        ),
    ),
    ("module", ("slope_lightning.module",)),
    (
        "entry points",
        (
            "slope_lightning.cli",
            "slope_lightning.cli_checks",
            "slope_lightning.cli_commands",
            "slope_lightning.cli_errors",
            "slope_lightning.cli_runs",
            "slope_lightning.generate",
            "slope_lightning.study.*",
            "slope_lightning.bench.*",
        ),
    ),
)
#: Third-party packages that only the Lightning layers (data and above) may import.
LIGHTNING_ONLY = {"lightning", "pytorch_lightning", "torchmetrics", "jsonargparse", "tensorboard"}
LIGHTNING_LAYER = next(i for i, (name, _) in enumerate(LAYERS) if name == "data")
#: The modules of ``callbacks/`` that every callback file may import (no callback is in them).
CALLBACKS_SHARED = (
    "slope_lightning.callbacks.shared",
    "slope_lightning.callbacks.lightning_internals",
)


def _specificity(module: str, pattern: str) -> int:
    """How closely ``pattern`` names ``module`` (its length), or -1 if it does not."""
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return len(base) if module == base or module.startswith(base + ".") else -1
    return len(pattern) if module == pattern else -1


def layer_of(module: str) -> int:
    """The rank of ``module`` in :data:`LAYERS`: the most specific pattern that names it.

    Raises:
        LookupError: no pattern names ``module`` (a new module must be placed in a layer).
    """
    best, rank = -1, -1
    for i, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            specificity = _specificity(module, pattern)
            if specificity > best:
                best, rank = specificity, i
    if rank < 0:
        raise LookupError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return rank


def imports_between_callbacks(edges: list[Edge]) -> list[str]:
    """Every import of a callback file by another module of ``callbacks/`` (the package's
    ``__init__`` re-exports them all and is exempt): each callback file may import only
    :data:`CALLBACKS_SHARED` from its package, and the shared modules no callback file."""
    package = "slope_lightning.callbacks"
    found = []
    for edge in edges:
        inside = edge.target == package or edge.target.startswith(package + ".")
        if not edge.source.startswith(package + ".") or not inside:
            continue
        if edge.target not in CALLBACKS_SHARED:
            found.append(f"a callback file imports another: {edge}")
    return found


def upward_imports(edges: list[Edge]) -> list[str]:
    """Every edge from a lower layer to a higher one, named with both layers."""
    found = []
    for edge in edges:
        source, target = layer_of(edge.source), layer_of(edge.target)
        if target > source:
            found.append(f"{LAYERS[source][0]} imports {LAYERS[target][0]}: {edge}")
    return found


# ------------------------------------------------------------------ the checks on this repo


@pytest.fixture(scope="module")
def graph() -> tuple[list[Edge], dict[str, set]]:
    return import_graph()


def test_the_import_graph_has_no_cycle(graph):
    edges, _ = graph
    assert len(edges) > 50  # the builder found the package's imports at all
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(describe(c) for c in cycles)


def test_every_layer_imports_only_the_layers_below_it(graph):
    edges, _ = graph
    upward = upward_imports(edges)
    assert not upward, "imports against the layering:\n" + "\n".join(upward)


def test_every_module_is_named_by_a_layer(graph):
    """No "everything else" layer: a new module is placed explicitly."""
    files: dict[str, Path] = {}
    for directory in PACKAGES:
        files |= module_files(directory)
    unplaced = []
    for module in files:
        try:
            layer_of(module)
        except LookupError as error:
            unplaced.append(str(error))
    assert not unplaced, "\n".join(unplaced)


def test_no_callback_file_imports_another(graph):
    edges, _ = graph
    callback_files = [e for e in edges if e.source.startswith("slope_lightning.callbacks.")]
    assert callback_files, "the callbacks package imports nothing: is it there?"
    wrong = imports_between_callbacks(edges)
    assert not wrong, "\n".join(wrong)


def test_kernels_import_nothing_from_the_library(graph):
    edges, _ = graph
    wrong = [
        str(e)
        for e in edges
        if e.source.split(".")[0] == "slope_kernels" and e.target.split(".")[0] != "slope_kernels"
    ]
    assert not wrong, "\n".join(wrong)


def test_the_torch_only_layers_import_no_lightning(graph):
    """kernels, utils, sparse, baselines and models: torch only (plus numpy, triton...)."""
    _, external = graph
    wrong = {
        module: sorted(names & LIGHTNING_ONLY)
        for module, names in external.items()
        if layer_of(module) < LIGHTNING_LAYER and names & LIGHTNING_ONLY
    }
    assert not wrong, wrong


LOADED_SCRIPT = """
import sys
{statement}
bad = sorted(
    name for name in sys.modules
    if name.split(".")[0] in ("lightning", "pytorch_lightning")
    or name == "slope_lightning.baselines" or name.startswith("slope_lightning.baselines.")
)
print("LOADED", bad)
"""


@pytest.mark.parametrize(
    "statement", ["import slope_lightning.sparse", "from slope_lightning import sparsify"]
)
def test_the_method_loads_neither_lightning_nor_the_baselines(statement):
    """A plain-PyTorch user of the method never pays for Lightning or the baselines."""
    done = subprocess.run(
        [sys.executable, "-c", LOADED_SCRIPT.format(statement=statement)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "LOADED []" in done.stdout, done.stdout


# ------------------------------------------------------------------ the checker itself


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "slope_kernels"


def test_the_graph_sees_function_level_relative_and_submodule_imports(tmp_path):
    package = write_package(
        tmp_path,
        {
            "slope_kernels/__init__.py": "from slope_kernels import b\n",
            "slope_kernels/a.py": "def f():\n    from .sub import c\n",
            "slope_kernels/b.py": "import slope_kernels.a as a\nfrom typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from slope_kernels import sub\n",
            "slope_kernels/sub/__init__.py": "from .. import b\n",
            "slope_kernels/sub/c.py": "from slope_kernels.sub import helper\nimport torch\n",
        },
    )
    edges, external = import_graph((package,))
    pairs = {(e.source, e.target) for e in edges}
    assert pairs == {
        ("slope_kernels", "slope_kernels.b"),  # from pkg import submodule
        ("slope_kernels.a", "slope_kernels.sub.c"),  # relative, inside a function
        ("slope_kernels.b", "slope_kernels.a"),  # import a.b as x; TYPE_CHECKING skipped
        ("slope_kernels.sub", "slope_kernels.b"),  # from .. import b
        ("slope_kernels.sub.c", "slope_kernels.sub"),  # from pkg import non-module name
    }
    assert external["slope_kernels.sub.c"] == {"torch"}
    cycles = find_cycles(edges)
    assert len(cycles) == 1
    text = describe(cycles[0])
    assert text.startswith(
        "slope_kernels.a -> slope_kernels.sub.c -> slope_kernels.sub -> slope_kernels.b -> "
        "slope_kernels.a"
    )
    assert "a.py:2" in text


def test_upward_imports_name_both_layers():
    edge = Edge("slope_lightning.sparse.linear", "slope_lightning.models.config", ROOT, 3)
    assert upward_imports([edge]) == [f"sparse imports models: {edge}"]
    assert layer_of("slope_lightning.optim") < layer_of("slope_lightning.callbacks")
    assert layer_of("slope_lightning.callbacks.shared") < layer_of(
        "slope_lightning.callbacks.slope"
    )
    assert layer_of("slope_lightning.checkpoints") < layer_of("slope_lightning.callbacks.shared")
    assert layer_of("slope_lightning.callbacks") < layer_of("slope_lightning.module")
    with pytest.raises(LookupError, match="slope_lightning.newthing is in no layer"):
        layer_of("slope_lightning.newthing")
    assert layer_of("slope_lightning.sparse.backends.ops") == layer_of("slope_lightning")
    assert layer_of("slope_lightning.sparse") < layer_of("slope_lightning.baselines.srste")
    assert layer_of("slope_lightning.utils") < layer_of("slope_lightning.sparse")
    assert layer_of("slope_kernels.packed_format") < layer_of("slope_lightning.utils")
    assert upward_imports([Edge("slope_lightning.bench.step", "slope_kernels", ROOT, 1)]) == []


def test_callback_files_may_import_only_the_shared_modules_of_their_package():
    def edge(source: str, target: str) -> Edge:
        return Edge(f"slope_lightning.callbacks.{source}", target, ROOT, 1)

    allowed = [
        edge("srste", "slope_lightning.callbacks.shared"),
        edge("lazy_lora", "slope_lightning.callbacks.lightning_internals"),
        edge("shared", "slope_lightning.sparse"),
        Edge("slope_lightning.callbacks", "slope_lightning.callbacks.slope", ROOT, 1),
    ]
    assert imports_between_callbacks(allowed) == []
    wrong = [
        edge("oneshot", "slope_lightning.callbacks.slope"),
        edge("mask_scheduler", "slope_lightning.callbacks"),  # the package: every callback
        edge("shared", "slope_lightning.callbacks.lazy_lora"),
    ]
    assert len(imports_between_callbacks(wrong)) == 3
