"""The package's imports point one way: no import cycle (module-level or inside a function), no import of another
module's private name, and the layers of docs/architecture.md (stage 1 <- stage 2 <- pipelines <- tools)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stage1_cam", "stage2_seg", "pipelines", "tools")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> Dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _resolve(module: str, is_pkg: bool, level: int, target: str) -> str:
    """Absolute module name of ``from <level dots><target> import ...`` inside ``module``."""
    if level == 0:
        return target
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(modules: Dict[str, Path]) -> Tuple[Dict[str, Set[str]], List[str]]:
    """Edges module -> imported project module (every import statement, wherever it stands), and the private
    names imported from another module."""
    edges: Dict[str, Set[str]] = {m: set() for m in modules}
    private: List[str] = []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                src = _resolve(mod, is_pkg, node.level, node.module or "")
                # `from pkg import sub` imports the submodule when one exists by that name
                targets = [(f"{src}.{a.name}", None) if f"{src}.{a.name}" in modules else (src, a.name)
                           for a in node.names]
            else:
                continue
            for target, name in targets:
                while target and target not in modules:  # `import a.b.c` -> the deepest project module
                    target = target.rpartition(".")[0]
                if not target or target == mod:
                    continue
                edges[mod].add(target)
                if name and name.startswith("_") and not name.startswith("__"):
                    private.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}.{name}")
    return edges, private


def _cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on: Set[str] = set()
    out: List[List[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    edges, _ = _imports(_modules())
    cycles = _cycles(edges)
    assert not cycles, "import cycles (each line one cycle):\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_names_imported_across_modules():
    _, private = _imports(_modules())
    assert not private, "\n".join(private)


def test_layers_point_one_way():
    edges, _ = _imports(_modules())
    rank = {"stage1_cam": 0, "stage2_seg": 1, "pipelines": 2, "tools": 3}  # tools may import all; nothing imports it
    wrong = [f"{m} -> {t}" for m, ts in edges.items() for t in ts if rank[t.split(".")[0]] > rank[m.split(".")[0]]]
    assert not wrong, "imports against the layers stage1_cam <- stage2_seg <- pipelines <- tools:\n" + "\n".join(wrong)


def test_the_checker_sees_cycles_and_private_names(tmp_path, monkeypatch):
    """The checks above would fail on a cycle hidden in a function and on a private import."""
    pkg = tmp_path / "stage1_cam"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import _g\n    return _g\n")
    for other in PACKAGES[1:]:
        (tmp_path / other).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    edges, private = _imports(_modules())
    assert _cycles(edges) == [["stage1_cam.a", "stage1_cam.b"]]
    assert private == ["stage1_cam/b.py:2 imports stage1_cam.a._g"]
