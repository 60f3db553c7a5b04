"""The house rules the code keeps (read from the source, nothing imported): no module uses another
top-level folder's `_private` names, the packages import one another one way only and without
circles, and no source file outgrows one idea."""

import ast
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The units of the house, by path, most specific first: the apps inside the one installed root are
# units of their own. Which units a unit may import (STYLE: kernels <- models <- infer / train <-
# bench, scripts; the top-level infer/ and train/ folders only hold the command-line shims).
UNITS = ("longspec_jax/infer", "longspec_jax/train", "longspec_jax", "pallas_kernels", "bench", "scripts",
         "examples", "infer", "train")
ALLOWED = {
    "pallas_kernels": set(),
    "longspec_jax": {"pallas_kernels"},
    "longspec_jax/infer": {"longspec_jax", "pallas_kernels"},
    "longspec_jax/train": {"longspec_jax", "pallas_kernels"},
    "bench": {"longspec_jax", "pallas_kernels", "longspec_jax/infer", "longspec_jax/train"},
    "scripts": {"longspec_jax", "pallas_kernels", "longspec_jax/infer", "longspec_jax/train"},
    "examples": {"longspec_jax", "pallas_kernels", "longspec_jax/infer", "longspec_jax/train"},
    "infer": {"longspec_jax/infer"},
    "train": {"longspec_jax/train"},
}
MAX_LINES = 460


def _unit_of_module(module: str) -> str | None:
    path = module.replace(".", "/")
    return next((u for u in UNITS if path == u or path.startswith(u + "/")), None)


def _modules():
    """(unit, path, syntax tree) of every source file; a notebook's code cells count as one module."""
    for top in ("longspec_jax", "pallas_kernels", "bench", "scripts", "examples", "infer", "train"):
        for path in sorted([*(ROOT / top).rglob("*.py"), *(ROOT / top).rglob("*.ipynb")]):
            rel = path.relative_to(ROOT).as_posix()
            unit = next(u for u in UNITS if rel.startswith(u + "/"))
            text = path.read_text(encoding="utf-8")
            if path.suffix == ".ipynb":
                text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "code")
            yield unit, path, ast.parse(text)


def _imports(tree):
    """(module, names, node) of every import, nested ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, [a.name for a in node.names], node
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node


def test_no_private_names_across_folders():
    bad = []
    for unit, path, tree in _modules():
        aliases = {}
        for module, names, node in _imports(tree):
            other = _unit_of_module(module)
            if other is not None and other != unit:
                for name in names:
                    aliases[name] = module
                    if name.startswith("_") and not name.startswith("__"):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {module}.{name}")
                if any(part.startswith("_") for part in module.split(".")[1:]):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports private module {module}")
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not bad, "\n".join(bad)


def test_dependencies_flow_one_way():
    bad = []
    for unit, path, tree in _modules():
        for module, _, node in _imports(tree):
            other = _unit_of_module(module)
            if other is not None and other != unit and other not in ALLOWED[unit]:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} ({unit}) imports {module}")
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    """Module-level imports (the ones that run at import time) form no cycle."""
    graph = {}
    for _, path, tree in _modules():
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        deps = set()
        for node in tree.body:  # top level only: imports inside functions cannot loop at import time
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                deps.add(node.module)
                deps.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = deps
    # `from pkg import mod` needs pkg.mod, and pkg only while pkg/__init__ runs first: a package
    # whose __init__ imports its own submodules is not a circle.
    graph = {m: {d for d in deps if d in graph and d != m and not m.startswith(d + ".")}
             for m, deps in graph.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in graph[m]:
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)


def test_files_stay_small():
    long = [f"{p.relative_to(ROOT)}: {n} lines" for _, p, _ in _modules()
            if p.suffix == ".py" and (n := p.read_text(encoding="utf-8").count("\n")) > MAX_LINES]
    assert not long, "\n".join(long)
