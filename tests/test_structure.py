"""The package's layering: ops/ is the one door to the kernels, imports never run in a circle, shared
launch arithmetic exists once, and renamed public names still work (with a DeprecationWarning).

Read from the source with ast. The circle check counts imports inside functions too: a lazy import
closes a circle at run time as surely as one at the top of a file.
"""

from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest
import torch

import unimoe_kernels
from unimoe_kernels import ops, reference

PKG_DIR = Path(unimoe_kernels.__file__).parent
PKG = "unimoe_kernels"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {_module_name(p): p for p in sorted(PKG_DIR.rglob("*.py"))}
    # Every check below passes vacuously on an empty tree; these are modules the layering is about.
    assert {f"{PKG}.modules", f"{PKG}.reference", f"{PKG}.ops.gating", f"{PKG}.kernels.grouped_mm"} <= set(found)
    return found


def _imports(name: str, path: Path, modules: dict[str, Path], top_level_only: bool) -> set[str]:
    """Package modules `name` imports (as resolved module names; `from . import x` names x itself)."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith(PKG))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith(PKG):
                continue
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.add(sub if sub in modules else mod)
    return {m for m in found if m in modules and m != name}


def test_only_ops_and_the_torch_path_import_reference():
    modules = _modules()
    allowed = {f"{PKG}.ops", f"{PKG}.baselines", f"{PKG}"}  # ops/, the baselines (oracles), the package
    offenders = []
    for name, path in modules.items():
        if name == f"{PKG}.reference" or any(name == a or name.startswith(a + ".") for a in allowed - {PKG}):
            continue
        if name == PKG:
            continue  # the package exposes the reference module as an attribute for users
        if f"{PKG}.reference" in _imports(name, path, modules, top_level_only=False):
            offenders.append(name)
    assert offenders == [], f"modules outside ops/ importing reference: {offenders}"


def test_modules_and_integrations_reach_kernels_only_through_ops():
    modules = _modules()
    for name, path in modules.items():
        if name != f"{PKG}.modules" and not name.startswith(f"{PKG}.integrations"):
            continue
        deps = _imports(name, path, modules, top_level_only=False)
        assert not {d for d in deps if d.startswith(f"{PKG}.kernels") or d == f"{PKG}.reference"}, (name, deps)


def test_no_import_circle():
    """No module's imports lead back to it, through any chain of package modules."""
    modules = _modules()
    # Edges into a package's __init__ are left out: importing a subpackage always runs its __init__,
    # which imports its own children, so they are not dependencies between modules.
    packages = {n for n, p in modules.items() if p.name == "__init__.py"}
    graph = {n: _imports(n, p, modules, top_level_only=False) - packages for n, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("helper", ["next_pow2", "cdiv", "unit_inner", "row_block", "_next_pow2", "_cdiv",
                                    "triton_cdiv", "_unit_inner"])
def test_launch_helpers_are_defined_once(helper):
    defining = [name for name, path in _modules().items()
                for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.FunctionDef) and node.name == helper]
    expected = [] if helper.startswith(("_", "triton_")) else [f"{PKG}.ops.launch_utils"]
    assert defining == expected


@pytest.mark.parametrize("name, new_home", [
    ("load_balancing_loss", ops.load_balancing_loss), ("z_loss", ops.z_loss),
    ("expert_capacity", ops.expert_capacity), ("apply_capacity", ops.apply_capacity),
    ("lora_rank_gates", ops.lora_rank_gates),
])
def test_moved_reference_names_warn_and_resolve(name, new_home):
    with pytest.warns(DeprecationWarning, match=f"reference.{name} moved"):
        assert getattr(reference, name) is new_home
    with pytest.raises(AttributeError):
        getattr(reference, "no_such_helper")


def test_build_routing_impl_is_a_deprecated_alias_of_backend():
    ids = torch.tensor([[2, 0], [1, 2], [0, 2]])
    with pytest.warns(DeprecationWarning, match="impl"):
        old = ops.build_routing(ids, 3, 4, impl="torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = ops.build_routing(ids, 3, 4, backend="torch")
    for a, b in zip(old[:-1], new[:-1]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="pass backend only"), pytest.warns(DeprecationWarning):
        ops.build_routing(ids, 3, 4, backend="c", impl="torch")
