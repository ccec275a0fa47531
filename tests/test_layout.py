"""The package's imports point one way, read from the source with ``ast`` (nothing is imported).

Layers, lowest first: errors -> io, config -> data, models -> (the package root) -> train -> evaluate -> interop -> viz ->
commands -> cli. A module may import its own package and lower layers; never a higher one, never a
sibling of the same layer (data and models stay independent), never in a circle; a command never
imports another command; maelab's own imports sit at module top (the CLI's deferred ones aside).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import maelab

PKG = Path(maelab.__file__).resolve().parent
LAYERS = [
    ("maelab.errors", "maelab.choices"),
    ("maelab.io", "maelab.config"),
    ("maelab.data", "maelab.models"),
    ("maelab",),  # the package root re-exports the model
    ("maelab.train",),
    ("maelab.evaluate",),
    ("maelab.interop",),
    ("maelab.transfer",),
    ("maelab.viz",),
    ("maelab.commands",),
    ("maelab.cli",),
    ("maelab.__main__",),  # `python -m maelab`: the CLI
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}
SHARED_COMMAND_MODULES = {"maelab.commands", "maelab.commands.session", "maelab.commands.steps"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def unit_of(module: str) -> str:
    """The layer unit a module belongs to: the longest layer name it starts with."""
    matches = [u for u in RANK if module == u or module.startswith(u + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return max(matches, key=len)


def imports_of(module: str) -> list[tuple[str, int, bool]]:
    """(imported maelab module, line, at module top) for every maelab import of ``module``."""
    tree = ast.parse(MODULES[module].read_text())
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.split(".")[0] == "maelab":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.append((sub if sub in MODULES else node.module, node.lineno, id(node) in top))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "maelab":
                    found.append((alias.name, node.lineno, id(node) in top))
    return found


GRAPH = {m: sorted({target for target, _, _ in imports_of(m) if target != m}) for m in MODULES}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        unit_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    src = unit_of(module)
    for target, line, _ in imports_of(module):
        dst = unit_of(target)
        if dst == src:
            continue
        assert RANK[dst] < RANK[src], (f"{module} (line {line}) imports {target}: {dst} is not below {src} "
                                       f"in the layers")


@pytest.mark.parametrize("module", sorted(set(MODULES) - {"maelab.cli"}))
def test_maelab_imports_are_at_module_top(module):
    """Except in the CLI, which imports the machinery of a command only once it runs one, so that
    `maelab --help` does not load torch (tested in test_cli)."""
    inner = [(t, line) for t, line, at_top in imports_of(module) if not at_top]
    assert not inner, f"{module} imports maelab modules inside functions: {inner}"


def test_no_command_imports_another_command():
    """Options (``maelab.commands.options.*``) are not commands: recipe and ablate read pretrain's."""
    commands = {m for m in MODULES if m.startswith("maelab.commands.") and not m.startswith("maelab.commands.options")}
    commands -= SHARED_COMMAND_MODULES
    assert len(commands) >= 8
    for module in commands:
        others = [t for t in GRAPH[module] if t in commands]
        assert not others, f"{module} imports another command: {others}"


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in GRAPH.get(module, []):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [module, target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_a_cycle_and_an_upward_import(monkeypatch):
    """The checks above can fail: a fake upward import and a fake cycle are caught."""
    assert RANK[unit_of("maelab.models.mae")] < RANK[unit_of("maelab.train.loop")]
    monkeypatch.setitem(GRAPH, "maelab.io", ["maelab.config"])
    monkeypatch.setitem(GRAPH, "maelab.config", ["maelab.io"])
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_the_import_graph_has_no_cycle()
