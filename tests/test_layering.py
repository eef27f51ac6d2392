"""The package's layering, read from the source with ``ast`` (nothing is imported):

- ``modeling`` imports nothing else from the package: ``lns_layers.py`` ships inside every checkpoint,
  where lns_surgery is not installed (``auto.py`` builds the same classes from it in this process);
- ``core`` imports only ``core`` and ``modeling``;
- a stage (conversion, training, analysis, publish, demo) imports from another stage only the names
  that stage exports in its package ``__init__``, and from the package itself only its public API
  (``lns_surgery.load_model``, ...), never another stage's modules;
- the package's own top-level modules (the CLI entry point, ``loading.py``) import only ``core``,
  ``modeling`` and each other: the CLI reaches the stages by module name, when a command runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lns_surgery"
STAGES = ("conversion", "training", "analysis", "publish", "demo")
SHARED_LAYERS = ("core", "modeling")
PLUMBING = "lns_surgery._lazy"  # the lazy exports every package __init__ is built with


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, module, names)`` of every import of the package in ``path``, relative ones resolved;
    ``names`` is empty for a plain ``import module``."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([target] if target else []))
            found.append((node.lineno, target, [alias.name for alias in node.names]))
    return [(line, target, names) for line, target, names in found
            if target == "lns_surgery" or target.startswith("lns_surgery.")]


def _exports(init: Path) -> set[str]:
    """What a package ``__init__`` offers: the keys of its lazy ``_API`` map and the public (or dunder)
    names it defines itself."""
    exported = set()
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = [target.id for target in node.targets if isinstance(target, ast.Name)]
            if targets == ["_API"] and isinstance(node.value, ast.Dict):
                exported |= {ast.literal_eval(key) for key in node.value.keys}
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            targets = [node.name]
        exported |= {name for name in targets if not name.startswith("_") or name.startswith("__")}
    return exported


MODULES = sorted(PACKAGE.rglob("*.py"))
EXPORTS = {stage: _exports(PACKAGE / stage / "__init__.py") for stage in STAGES}
PUBLIC_API = _exports(PACKAGE / "__init__.py")


def _layer(module: str) -> str:
    """The sub-package ``module`` belongs to, or "" for the package itself and its own modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else ""


def _violations(layer: str, allowed) -> list[str]:
    """``file:line: import`` for every import in ``layer`` that ``allowed(line, target, names)`` refuses."""
    problems = []
    for path in MODULES:
        if _layer(_module_name(path)) != layer:
            continue
        for line, target, names in _imports(path):
            if not allowed(path, target, names):
                what = f"from {target} import {', '.join(names)}" if names else f"import {target}"
                problems.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {what}")
    return problems


def _within(target: str, *layers: str) -> bool:
    return any(target == f"lns_surgery.{layer}" or target.startswith(f"lns_surgery.{layer}.") for layer in layers)


def test_the_layers_are_found():
    assert {_layer(_module_name(path)) for path in MODULES} == {"", *STAGES, *SHARED_LAYERS}
    assert "architecture_for_model" in EXPORTS["conversion"] and "push_to_hub" in EXPORTS["publish"]
    assert {"load_model", "convert", "__version__"} <= PUBLIC_API


def test_modeling_imports_nothing_else_from_the_package():
    def allowed(path, target, names):
        if path.name == "lns_layers.py":  # it ships inside checkpoints: not even the rest of modeling
            return False
        return _within(target, "modeling")

    assert _violations("modeling", allowed) == []


def test_core_imports_only_core_and_modeling():
    assert _violations("core", lambda path, target, names: _within(target, *SHARED_LAYERS)) == []


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_uses_other_stages_only_through_their_public_api(stage):
    def allowed(path, target, names):
        if _within(target, stage, *SHARED_LAYERS) or target == PLUMBING:
            return True
        if target == "lns_surgery":  # the package's public API
            return set(names) <= PUBLIC_API
        other = target.split(".")[1]
        return other in STAGES and target == f"lns_surgery.{other}" and set(names) <= EXPORTS[other]

    assert _violations(stage, allowed) == []


def test_the_packages_own_modules_import_only_core_modeling_and_each_other():
    def allowed(path, target, names):
        # not `from lns_surgery import ...` either: those names live in the stages
        return _within(target, *SHARED_LAYERS) or (_layer(target) == "" and target != "lns_surgery")

    assert _violations("", allowed) == []
