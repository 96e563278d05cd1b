"""The package's shape: imports run only downward, modules stay short, and
``epcli/__init__.py``'s lazy table matches its ``TYPE_CHECKING`` block.

Levels, bottom first: the floor (errors, limits, text, version, devices, progress) and ``core`` (pure math);
``storage`` (bytes); ``layers``; ``convert``; ``checkpoint`` (the schema); ``onnx``; ``verification``;
``artifacts`` (what the jobs that write files share); ``jobs`` (which never import each other); ``cli``. A
module may import its own package and anything on a lower level, never a higher one.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "epcli"
LEVELS = {
    "epcli._version": 0, "epcli.errors": 0, "epcli.limits": 0, "epcli.text": 0, "epcli.devices": 0,
    "epcli.progress": 0, "epcli.core": 0,
    "epcli.storage": 1,
    "epcli.layers": 2,
    "epcli.convert": 3,
    "epcli.checkpoint": 4,
    "epcli.onnx": 5,
    "epcli.verification": 6,
    "epcli.artifacts": 7,
    "epcli.jobs": 8,
    "epcli.cli": 9,
    "epcli.__main__": 10,
}
MAX_LINES = 500
LENGTH_REASON = "Longer than 500 lines because"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _unit(module: str) -> str:
    """The key of LEVELS a module belongs to (its package, or the module itself on the floor)."""
    unit = next((key for key in LEVELS if module == key or module.startswith(key + ".")), None)
    assert unit is not None, f"{module} has no level: add it to LEVELS in {__file__}"
    return unit


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("epcli"):
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("epcli"))
    return names


MODULES = _modules()


def test_every_module_has_a_level():
    for name in MODULES:
        if name != "epcli":
            _unit(name)


@pytest.mark.parametrize("module", sorted(name for name in MODULES if name != "epcli"))
def test_imports_run_only_downward(module: str):
    unit = _unit(module)
    upward = []
    for target in sorted(_imports(MODULES[module])):
        if target == "epcli":
            upward.append(f"{target} (the public API: import the module that defines the name)")
            continue
        other = _unit(target)
        if other == unit:
            continue
        if LEVELS[other] > LEVELS[unit] or (unit == "epcli.core" and other != "epcli.core"):
            upward.append(target)
    assert not upward, f"{module} imports {upward}, which are not below it"


@pytest.mark.parametrize("module", sorted(name for name in MODULES if name.startswith("epcli.jobs.")))
def test_jobs_never_import_each_other(module: str):
    siblings = sorted(t for t in _imports(MODULES[module]) if t.startswith("epcli.jobs.") and t != module)
    assert not siblings, f"{module} imports the jobs {siblings}: move what they share below the jobs"


COMMAND_MODULES = ("epcli.cli.collapse", "epcli.cli.verify", "epcli.cli.export", "epcli.cli.inspect")


@pytest.mark.parametrize("module", COMMAND_MODULES)
def test_commands_never_import_each_other(module: str):
    siblings = sorted(t for t in _imports(MODULES[module]) if t in COMMAND_MODULES and t != module)
    assert not siblings, f"{module} imports the commands {siblings}: move what they share to epcli.cli.reports"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_short_or_say_why(module: str):
    text = MODULES[module].read_text()
    lines = text.count("\n")
    if lines > MAX_LINES:
        docstring = ast.get_docstring(ast.parse(text)) or ""
        assert LENGTH_REASON in docstring, (
            f"{module} has {lines} lines: split it by concept, or state '{LENGTH_REASON} ...' in its docstring"
        )


def test_lazy_table_matches_the_type_checking_block():
    import epcli

    tree = ast.parse(MODULES["epcli"].read_text())
    block = next(
        node for node in tree.body
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
    )
    typed = {
        alias.asname or alias.name: node.module
        for node in block.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert typed == epcli._LAZY
    for name, module in epcli._LAZY.items():
        assert name in epcli.__all__
        assert getattr(epcli, name) is getattr(importlib.import_module(module), name)
    assert sorted(epcli.__all__) == sorted(set(epcli.__all__)), "a name is listed twice in __all__"
