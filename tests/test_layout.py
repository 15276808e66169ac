"""The package's layout: stages that data flows through, one way, and no import cycle.

Every import inside ``anatcl_infer`` (module level and inside functions, ``TYPE_CHECKING`` blocks
excepted) must point at the same or a lower stage, with no exception, and the graph of those
imports has no cycle. Stages are given per top-level name, or per module where a folder spans
stages: ``model.resnet`` (the bare network) is stage 1, while ``model.network`` (the public
``AnatCL``, whose ``encode``/``from_pretrained``/``save_pretrained`` call the encoder and the
weights stage) sits above both.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PKG_DIR = Path(__file__).resolve().parents[1] / "anatcl_infer"

#: Stage of each top-level name of the package, lowest first; a dotted key (``model.resnet``) gives
#: one module its own stage, and ``<package>.__init__`` a package's ``__init__``. A module takes the
#: stage of its longest listed prefix.
STAGES = {
    "_version": 0, "errors": 0, "_optional": 0, "config": 0, "_files": 0,
    "inputs": 1, "model.resnet": 1, "model.fused": 1, "model.devices": 1,
    "weights": 2,
    "encoding": 3,
    # the public AnatCL: the stage-1 network plus conveniences calling the encoder and the weights
    # stage; the package's __init__ re-exports it
    "model.network": 3.5, "model.__init__": 3.5,
    "downstream": 4, "sklearn": 4,
    "qc": 5,
    "jobs": 6,
    "training": 7,
    "cli": 8, "__main__": 8, "__init__": 8,
}


def _modules(pkg_dir: Path = PKG_DIR) -> dict[str, Path]:
    out = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        parts = [pkg_dir.name, *path.relative_to(pkg_dir).with_suffix("").parts]
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
    root = name.split(".")[0]
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
                if mod.split(".")[0] == root:
                    for alias in child.names:  # `from .pkg import submodule` imports the submodule
                        full = resolve(f"{mod}.{alias.name}") if f"{mod}.{alias.name}" in modules else resolve(mod)
                        if full:
                            found.append((full, top))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == root:
                        full = resolve(alias.name)
                        if full:
                            found.append((full, top))
            inner_top = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            visit(child, inner_top)

    visit(tree, True)
    return found


def _stage(module: str, modules: dict[str, Path]) -> float:
    parts = module.split(".")[1:]
    if modules[module].name == "__init__.py":
        parts.append("__init__")
    for n in range(len(parts), 0, -1):
        key = ".".join(parts[:n])
        if key in STAGES:
            return STAGES[key]
    raise KeyError(f"{module} has no stage: add it (or its folder) to STAGES in {Path(__file__).name}")


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions.

    ``from pkg import sub`` imports the submodule ``pkg.sub``; ``import pkg.sub`` and
    ``from pkg.sub import name`` import ``pkg.sub`` only (not ``pkg``'s ``__init__``).
    """
    return {name: {t for t, _top in _imports(name, path, modules) if t != name} for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_every_module_imports():
    for name in _modules():
        if name.endswith("__main__"):
            continue
        importlib.import_module(name)


def test_every_module_has_a_stage():
    modules = _modules()
    for name in modules:
        _stage(name, modules)


def test_no_lower_stage_imports_a_higher_one():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target, _top in _imports(name, path, modules):
            if _stage(target, modules) > _stage(name, modules):
                bad.append(f"{name} (stage {_stage(name, modules)}) imports {target} (stage {_stage(target, modules)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_even_through_imports_inside_functions():
    cycle = _find_cycle(_graph(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_loaders_build_the_public_class_without_importing_it():
    """The weights stage gets ``AnatCL`` by registration: importing only the base module registers it."""
    code = (
        "from anatcl_infer.model.resnet import model_class\n"
        "from anatcl_infer.weights.checkpoint import model_with_weights\n"
        "cls = model_class()\n"
        "print(cls.__module__, cls.__name__, hasattr(cls, 'encode'))\n"
    )
    root = str(PKG_DIR.parent)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["anatcl_infer.model.network", "AnatCL", "True"]
    modules = _modules()
    for low in ("anatcl_infer.weights.checkpoint", "anatcl_infer.weights.loading", "anatcl_infer.weights.convert",
                "anatcl_infer.encoding.encoder", "anatcl_infer.model.resnet"):
        assert "anatcl_infer.model.network" not in _graph(modules)[low], f"{low} imports the public class"


def test_the_checker_sees_what_it_must(tmp_path):
    """The graph builder and the cycle finder on a made-up package: what they count is what they claim."""
    pkg = tmp_path / "fakepkg"
    files = {
        "__init__.py": "from .low import base\n",
        "low.py": """
            from typing import TYPE_CHECKING
            if TYPE_CHECKING:
                from .high import Public  # typing only: no edge
            base = 1
            def build():
                from .mid import helper  # inside a function: an edge
        """,
        "mid.py": "import fakepkg.sub.leaf  # the submodule, not fakepkg's __init__\n",
        "other.py": "from . import mid  # a submodule\nfrom .sub import leaf\n",
        "high.py": "from .sub.leaf import thing\n",
        "sub/__init__.py": "",
        "sub/leaf.py": "class Public:\n    def go(self):\n        from ..high import x\n",
    }
    for rel, text in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(textwrap.dedent(text))
    modules = _modules(pkg)
    graph = _graph(modules)
    assert graph == {
        "fakepkg": {"fakepkg.low"},
        "fakepkg.low": {"fakepkg.mid"},
        "fakepkg.mid": {"fakepkg.sub.leaf"},
        "fakepkg.other": {"fakepkg.mid", "fakepkg.sub.leaf"},
        "fakepkg.high": {"fakepkg.sub.leaf"},
        "fakepkg.sub": set(),
        "fakepkg.sub.leaf": {"fakepkg.high"},
    }
    assert _imports("fakepkg.low", modules["fakepkg.low"], modules) == [("fakepkg.mid", False)]
    assert _imports("fakepkg.sub.leaf", modules["fakepkg.sub.leaf"], modules) == [("fakepkg.high", False)]
    cycle = _find_cycle(graph)  # only through the import inside a method
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"fakepkg.high", "fakepkg.sub.leaf"}
    graph["fakepkg.sub.leaf"] = set()
    assert _find_cycle(graph) is None


def test_stages_per_module():
    modules = _modules()
    assert _stage("anatcl_infer.model.resnet", modules) == _stage("anatcl_infer.model.devices", modules) == 1
    assert _stage("anatcl_infer.weights", modules) == _stage("anatcl_infer.weights.loading", modules) == 2
    assert _stage("anatcl_infer.encoding.encoder", modules) < _stage("anatcl_infer.model.network", modules)
    assert _stage("anatcl_infer.model", modules) == _stage("anatcl_infer.model.network", modules)
    assert _stage("anatcl_infer", modules) == STAGES["__init__"]


def test_folders_name_the_stages():
    folders = {p.name for p in PKG_DIR.iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert {"inputs", "model", "weights", "encoding", "downstream", "qc", "jobs", "training", "cli"} <= folders
    loose = sorted(p.name for p in PKG_DIR.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "_files.py", "_optional.py", "_version.py", "config.py", "errors.py", "sklearn.py"]


#: a room a newcomer can hold in their head
MAX_MODULE_LINES = 600


def test_no_module_is_longer_than_a_room():
    long = {name: n for name, path in _modules().items()
            if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert not long, f"split these modules by responsibility (over {MAX_MODULE_LINES} lines): {long}"
