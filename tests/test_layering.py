"""The package's shape: no source file over 500 lines, no import circle among its modules, and no
import pointing up the layers.

The layers, bottom first (a module imports its own layer and those below it, never one above):

    errors                      the exception root
    config, torch_private       the run's configuration; the private torch names, read in one place
    kernels, model              the operations and their backends; the LLaMA model
    parallel                    meshes, FSDP/TP/PP/CP applied to a model
    models                      each model family described once (model, layout, name maps, FLOPs)
    data                        tokenizers, indexed corpora, datasets, the loader
    checkpoint, evaluation      saving, resuming and converting; scoring tasks
    training                    the engine and the loop
    tools, pretrain             the command lines

Deferred imports inside functions count for the layers (they are dependencies all the same); the
circle check reads the imports that run when a module loads.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_mellama"
MAX_LINES = 500
LAYERS = [
    {"errors"},
    {"config", "torch_private"},
    {"kernels", "model"},
    {"parallel"},
    {"models"},
    {"data"},
    {"checkpoint", "evaluation"},
    {"training"},
    {"tools", "pretrain"},
]
LEVEL = {area: level for level, areas in enumerate(LAYERS) for area in areas}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _area(module: str) -> str:
    """`megatron_mellama.data.loader` -> `data`; `megatron_mellama.errors` -> `errors`."""
    return module.split(".")[1]


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The package's modules an import statement in `module` loads (a name taken from a package's
    `__init__` counts as that package)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        source = node.module or ""
        if node.level:
            base = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = base[:len(base) - node.level + 1]
            source = ".".join(base + ([node.module] if node.module else []))
        names = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source for alias in node.names]
    # the root package's __init__ holds only its docstring: no layer
    return [name for name in names if name in MODULES and name != module and name != PACKAGE.name]


def _imports(module: str, deferred: bool) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    if deferred:
        nodes = [node for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))]
    else:
        nodes, pending = [], list(tree.body)
        while pending:  # the statements that run at load: the top level and its if/try/with blocks
            node = pending.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                nodes.append(node)
            elif isinstance(node, (ast.If, ast.Try, ast.With)):
                pending += node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
                pending += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
    return {target for node in nodes for target in _targets(node, module)}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, without recursion)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
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
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_every_area_of_the_package_has_a_layer():
    assert {_area(module) for module in MODULES if module != PACKAGE.name} <= set(LEVEL)


def test_no_source_file_is_over_500_lines():
    long = {str(path.relative_to(PACKAGE.parent)): n for path in MODULES.values()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_no_import_circle_among_the_modules():
    graph = {module: _imports(module, deferred=False) for module in MODULES}
    assert _circles(graph) == []


def test_no_import_points_up_the_layers():
    upward = sorted(f"{module} imports {target}" for module in MODULES if module != PACKAGE.name
                    for target in _imports(module, deferred=True)
                    if LEVEL[_area(target)] > LEVEL[_area(module)])
    assert upward == []


def test_the_checks_see_a_circle_and_the_imports():
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert {_area(target) for target in _imports("megatron_mellama.pretrain", deferred=True)} >= {"config", "training"}
