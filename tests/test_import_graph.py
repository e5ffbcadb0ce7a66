"""Imports run one way (STYLE.md, "Seams to keep clean"), checked by reading the source.

Every module of mmretrieve is parsed with ``ast``; every import in it counts, at module level and
inside functions alike (a lazy import is still a dependency). Each module belongs to one layer of
``LAYERS``; a module may import its own layer and the layers below it, never one above, and no two
modules may import each other through any chain (an import loop).

Run as a script to print the graph's violations: ``python tests/test_import_graph.py``.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = "mmretrieve"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# STYLE.md's order, lowest first: base -> plugin core -> encoders/model -> train/evaluate -> fusion
# -> index and export -> runtime -> api/serve -> cli. Each entry names a module or a package (all
# its submodules); a module takes the layer of its longest matching entry, an exact one ("=") first.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("mmretrieve", "mmretrieve.errors", "mmretrieve.atomic", "mmretrieve.formats",
              "mmretrieve.config", "mmretrieve.images", "mmretrieve.preprocess", "mmretrieve.progress",
              "mmretrieve.data", "mmretrieve.metrics", "mmretrieve.hookspecs", "mmretrieve.decode",
              "mmretrieve.augment", "mmretrieve.embedding", "mmretrieve.threads", "mmretrieve.allocator")),
    ("plugin core", ("mmretrieve.specs", "mmretrieve.registry", "mmretrieve.plugins", "mmretrieve.default_plugins")),
    ("encoders/model", ("mmretrieve.encoders", "mmretrieve.bridge", "mmretrieve.model", "mmretrieve.bundle",
                        "mmretrieve.pairs")),
    ("train/evaluate", ("mmretrieve.train", "mmretrieve.evaluate", "mmretrieve.embed")),
    ("fusion", ("mmretrieve.fusion",)),
    # "=name": that module alone. mmretrieve.runtime itself is the runtimes' factory (load_embedder picks a
    # registered runtime through the registry, like create_encoder), which the index reader calls; the
    # runtimes (runtime.torch_runtime, runtime.onnx_runtime, ...) sit above index and export.
    ("index and export", ("mmretrieve.index", "mmretrieve.export", "=mmretrieve.runtime")),
    ("runtime", ("mmretrieve.runtime",)),
    ("api/serve", ("mmretrieve.api", "mmretrieve.serve", "mmretrieve.describe")),
    ("cli", ("mmretrieve.cli", "mmretrieve.__main__")),
]
RANK = {name: rank for rank, (name, _) in enumerate(LAYERS)}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the package."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def layer_of(module: str) -> str:
    best, layer = -1, None
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if prefix.startswith("="):
                if module == prefix[1:]:
                    return name
            elif (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, layer = len(prefix), name
    if layer is None:
        raise KeyError(f"{module} has no layer in LAYERS; add it to the table")
    return layer


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[tuple[str, int]]:
    """(imported mmretrieve module, line) for every import in the file, lazy ones included."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()

    def add(name: str, line: int) -> None:
        while name and name not in modules:  # an attribute of a module: the module itself
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add((name, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == PACKAGE or source.startswith(PACKAGE + ".")):
                continue
            for alias in node.names:  # `from . import x`: x may be a submodule
                submodule = f"{source}.{alias.name}"
                add(submodule if submodule in modules else source, node.lineno)
    return found


def import_graph(root: Path = ROOT) -> dict[str, set[tuple[str, int]]]:
    modules = module_files(root)
    return {module: imports_of(module, path, modules) for module, path in modules.items()}


def upward_imports(graph) -> list[str]:
    lines = []
    for module in sorted(graph):
        for target, line in sorted(graph[module]):
            if RANK[layer_of(target)] > RANK[layer_of(module)]:
                lines.append(f"{module}:{line} ({layer_of(module)}) imports {target} ({layer_of(target)})")
    return lines


def import_loops(graph) -> list[str]:
    """Strongly connected components of more than one module (Tarjan), each as one line."""
    edges = {module: sorted({target for target, _ in targets}) for module, targets in graph.items()}
    index, low, stack, on_stack, loops = {}, {}, [], set(), []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                loops.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(edges):
        if module not in index:
            visit(module)
    lines = []
    for component in loops:
        members = set(component)
        detail = [f"{a}:{line} -> {b}" for a in sorted(members) for b, line in sorted(graph[a]) if b in members]
        lines.append("import loop between " + ", ".join(sorted(members)) + ": " + "; ".join(detail))
    return sorted(lines)


def violations(root: Path = ROOT) -> list[str]:
    graph = import_graph(root)
    return upward_imports(graph) + import_loops(graph)


def test_every_module_has_a_layer():
    for module in module_files():
        layer_of(module)
    assert layer_of("mmretrieve.runtime") == "index and export"  # the factory alone, by its exact entry
    assert layer_of("mmretrieve.runtime.onnx_runtime") == layer_of("mmretrieve.runtime.onnx_fusion") == "runtime"
    assert layer_of("mmretrieve.index.fused") == "index and export" and layer_of("mmretrieve.__main__") == "cli"


def test_no_module_imports_a_higher_layer_or_loops():
    found = violations()
    assert not found, f"{len(found)} import-graph violations:\n" + "\n".join(found)


def test_the_check_sees_lazy_upward_imports_and_loops(tmp_path):
    package = tmp_path / PACKAGE
    (package / "index").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("def f():\n    from .index.store import x\n")  # lazy, upward
    (package / "index" / "__init__.py").write_text("")
    (package / "index" / "store.py").write_text("from . import search\n")
    (package / "index" / "search.py").write_text("def g():\n    from mmretrieve.index import store\n")
    found = violations(package)
    assert found == ["mmretrieve.errors:2 (base) imports mmretrieve.index.store (index and export)",
                     "import loop between mmretrieve.index.search, mmretrieve.index.store: "
                     "mmretrieve.index.search:2 -> mmretrieve.index.store; "
                     "mmretrieve.index.store:1 -> mmretrieve.index.search"]


if __name__ == "__main__":
    problems = violations()
    print("\n".join(problems) if problems else "no upward imports, no import loops")
    print(f"{len(problems)} violations in {len(module_files())} modules", file=sys.stderr)
    sys.exit(1 if problems else 0)
