"""The package's layout: stages that data flows through, one way, and no import cycle.

Every import inside ``anatcl_infer`` (module level and inside functions, ``TYPE_CHECKING`` blocks
excepted) must point at the same or a lower stage. Convenience methods that reach up (``AnatCL.encode``
calls the encoder, ``AnatCL.save_pretrained`` the checkpoint writer) are listed in ``UPWARD`` and
import lazily, inside the method.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PKG_DIR = Path(__file__).resolve().parents[1] / "anatcl_infer"

#: Stage of each top-level name of the package, lowest first.
STAGES = {
    "_version": 0, "errors": 0, "_optional": 0, "config": 0, "_files": 0,
    "inputs": 1, "model": 1,
    "weights": 2,
    "encoding": 3,
    "downstream": 4, "sklearn": 4,
    "qc": 5,
    "jobs": 6,
    "training": 7,
    "cli": 8, "__main__": 8, "__init__": 8,
}

#: (importing module, imported module) pairs allowed to reach a higher stage, lazily.
UPWARD = {
    ("anatcl_infer.model.network", "anatcl_infer.encoding.encoder"),
    ("anatcl_infer.model.network", "anatcl_infer.weights.checkpoint"),
    # Hub conventions (AnatCL.from_pretrained / push_to_hub, the PyTorchModelHubMixin API): loading goes
    # through load_model (strict keys, safe formats, hashes) and publishing through weights.publish
    ("anatcl_infer.model.network", "anatcl_infer.weights.loading"),
    ("anatcl_infer.model.network", "anatcl_infer.weights.download"),
    ("anatcl_infer.model.network", "anatcl_infer.weights.publish"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PKG_DIR.rglob("*.py")):
        parts = ["anatcl_infer", *path.relative_to(PKG_DIR).with_suffix("").parts]
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported package module, at module level?) for every import in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    found: list[tuple[str, bool]] = []

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            if isinstance(child, ast.ImportFrom):
                if child.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.startswith("anatcl_infer"):
                    for alias in child.names:  # `from .pkg import submodule` imports the submodule
                        full = resolve(f"{mod}.{alias.name}") if f"{mod}.{alias.name}" in modules else resolve(mod)
                        if full:
                            found.append((full, top))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("anatcl_infer"):
                        full = resolve(alias.name)
                        if full:
                            found.append((full, top))
            inner_top = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner_top)

    visit(tree, True)
    return found


def _stage(module: str) -> int:
    parts = module.split(".")
    return STAGES["__init__"] if len(parts) == 1 else STAGES[parts[1]]


def test_every_module_imports():
    for name in _modules():
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


def test_every_top_level_name_has_a_stage():
    for name in _modules():
        _stage(name)


def test_no_lower_stage_imports_a_higher_one():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target, _top in _imports(name, path, modules):
            if _stage(target) > _stage(name) and (name, target) not in UPWARD:
                bad.append(f"{name} (stage {_stage(name)}) imports {target} (stage {_stage(target)})")
    assert not bad, "\n".join(bad)


def test_upward_conveniences_import_lazily():
    modules = _modules()
    for name, target in UPWARD:
        tops = [top for t, top in _imports(name, modules[name], modules) if t == target]
        assert tops and not any(tops), f"{name} -> {target} must be imported inside the method only"


def test_no_import_cycle():
    modules = _modules()
    graph = {name: {t for t, top in _imports(name, path, modules) if top and t != name}
             for name, path in modules.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle with them
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            dfs(node)


def test_folders_name_the_stages():
    folders = {p.name for p in PKG_DIR.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert {"inputs", "model", "weights", "encoding", "downstream", "qc", "jobs", "training", "cli"} <= folders
    loose = sorted(p.name for p in PKG_DIR.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "_files.py", "_optional.py", "_version.py", "config.py", "errors.py", "sklearn.py"]
