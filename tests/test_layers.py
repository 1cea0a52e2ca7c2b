"""The package's shape: layers that import only downwards, no cycles, click only in `cli/`.

The layer order is the one docs/ARCHITECTURE.md writes down. Imports are read from the source
(every ``import``, at module level or inside a function), so a late import cannot hide an
upward arrow or a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "retrieval"

# Bottom first. Packages on one line are siblings: neither may import the other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "files"),
    ("scoring",),
    ("corpus",),
    ("model",),
    ("index", "train"),
    ("query",),
    ("eval",),
    ("serve",),
    ("cli",),
)
RANK = {room: rank for rank, rooms in enumerate(LAYERS) for room in rooms}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every ``retrieval...`` module (or package) the file imports, resolved to absolute names."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import x` imports module x of that package; `from .m import y`, module m
            subs = {f"{target}.{a.name}" for a in node.names if _is_module(f"{target}.{a.name}")}
            found |= subs or {target}
    return {m for m in found if m == "retrieval" or m.startswith("retrieval.")}


def _is_module(name: str) -> bool:
    rel = Path(*name.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").is_file() or (PACKAGE / rel / "__init__.py").is_file()


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root itself


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in _imports(p) if t in modules} for m, p in modules.items()}


def test_every_room_is_in_the_layer_order():
    rooms = {p.stem for p in PACKAGE.glob("*.py") if not p.name.startswith("_")}
    rooms |= {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert rooms == set(RANK), "a new top-level module or package needs a place in LAYERS"


def test_imports_only_go_down_the_layers():
    upward = []
    for module, targets in _graph().items():
        here = _room(module)
        if here is None:  # retrieval/__init__.py: the public API, lazily importing any layer
            continue
        for target in targets:
            there = _room(target)
            if there is None:
                if target != "retrieval":
                    upward.append(f"{module} -> {target}")
                continue  # `from retrieval import __version__`
            if there != here and RANK[there] >= RANK[here]:
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that do not go down a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = _graph()
    for targets in graph.values():
        targets.discard("retrieval")  # the root only re-exports lazily
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return [*path[path.index(t) :], t]
            if t not in state and (cycle := visit(t)):
                return cycle
        state[m] = 2
        path.pop()
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_a_cycle_and_an_upward_import_would_be_seen(tmp_path, monkeypatch):
    """The checks above on a made-up package: they must find what they look for."""
    pkg = tmp_path / "retrieval"
    for room, body in {
        "corpus": "from ..index import a\n",  # upward: corpus is below index
        "index": "from . import b\n",
    }.items():
        (pkg / room).mkdir(parents=True)
        (pkg / room / "__init__.py").write_text("")
        (pkg / room / "a.py").write_text(body)
    (pkg / "index" / "b.py").write_text("from .a import x\n")
    (pkg / "index" / "a.py").write_text("from .b import y\n")  # a <-> b
    (pkg / "__init__.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(AssertionError, match="corpus.a -> retrieval.index"):
        test_imports_only_go_down_the_layers()
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()


def test_library_modules_import_without_click():
    """Every module outside `cli/` imports in a fresh interpreter without loading click."""
    library = sorted(
        _module_name(p)
        for p in PACKAGE.rglob("*.py")
        if "cli" not in p.relative_to(PACKAGE).parts[:1] and p.name != "__main__.py"
    )
    assert len(library) > 30
    code = (
        "import importlib, sys\n"
        f"for m in {library!r}:\n"
        "    importlib.import_module(m)\n"
        "    assert 'click' not in sys.modules, m\n"
        "print('ok', len(sys.modules))\n"
    )
    assert _fresh_python(code).startswith("ok")


def test_the_command_line_starts_without_torch_or_faiss():
    """`retrieval --help` and option defaults come from light modules only."""
    code = (
        "import sys\n"
        "import retrieval.cli\n"
        "heavy = [m for m in ('torch', 'faiss', 'open_clip', 'fastapi') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    assert _fresh_python(code).strip() == "[]"


def _fresh_python(code: str) -> str:
    """What ``code`` prints, run in a new interpreter from the repository root."""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout
