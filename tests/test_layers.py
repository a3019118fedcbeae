"""The floors of docs/architecture.md hold: no module of platform/topro imports one on a higher floor.

Every import statement counts, at any depth (function-local imports too: deferring an import hides a
dependency from the reader, not from the floors). The floors are declared once, in the table of
docs/architecture.md, and read from it here; the most specific room names a module's floor
(``llm/evaluate.py`` sits above ``llm/``).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "platform" / "topro"
ARCHITECTURE = REPO / "docs" / "architecture.md"
FLOOR_ROW = re.compile(r"^\| (\d)\. [^|]*\| ([^|]*) \|", re.M)
ROOM = re.compile(r"`([\w/]+(?:\.py|/))`")
RAY_FLOOR = 5
"""Ray (Train, Tune, Serve) is imported from this floor up (``cluster/`` and the faces)."""
MLFLOW_ROOMS = ("tracking/",)
"""Below the Ray floor only these rooms import MLflow."""


def declared_floors(doc: str) -> dict[str, int]:
    """room (``config.py``, ``methods/``) -> floor number, from the floor table of the architecture page."""
    section = doc.split("## Floors", 1)[1].split("\n## ", 1)[0]
    floors = {room: int(n) for n, rooms in FLOOR_ROW.findall(section) for room in ROOM.findall(rooms)}
    assert floors, "docs/architecture.md: no floor table under '## Floors'"
    return floors


def room_of(relative: str, floors: dict[str, int]) -> str:
    rooms = [room for room in floors if relative == room or (room.endswith("/") and relative.startswith(room))]
    if not rooms:
        raise AssertionError(f"platform/topro/{relative} is on no floor of docs/architecture.md: add it to the table")
    return max(rooms, key=len)


def module_file(name: str, root: Path) -> str | None:
    """``topro.methods.base`` -> ``methods/base.py``; ``topro.methods`` -> ``methods/__init__.py``."""
    parts = name.split(".")
    if parts[0] != root.name:
        return None
    path = root.joinpath(*parts[1:])
    if (path / "__init__.py").is_file():
        return (path / "__init__.py").relative_to(root).as_posix()
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py").relative_to(root).as_posix()
    return None


def imported_modules(tree: ast.AST, root: Path) -> list[tuple[int, str, str]]:
    """(line, imported name, its file under ``root`` or ``""`` for a third-party one) of every import."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, module_file(alias.name, root) or "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # ``from topro import tracking`` imports the module topro.tracking
                name = f"{node.module}.{alias.name}"
                target = module_file(name, root)
                found.append((node.lineno, name if target else node.module,
                              target or module_file(node.module, root) or ""))
    return found


def violations(root: Path, floors: dict[str, int]) -> list[str]:
    """One line per import that goes up a floor, or reaches Ray or MLflow below their floor."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        room = room_of(relative, floors)
        floor = floors[room]
        for line, name, target in imported_modules(ast.parse(path.read_text()), root):
            where = f"{relative}:{line} (floor {floor}) imports {name}"
            top = name.split(".")[0]
            if target and floors[room_of(target, floors)] > floor:
                problems.append(f"{where} (floor {floors[room_of(target, floors)]})")
            elif top == "ray" and floor < RAY_FLOOR:
                problems.append(f"{where}: Ray only from floor {RAY_FLOOR}")
            elif top == "mlflow" and floor < RAY_FLOOR and room not in MLFLOW_ROOMS:
                problems.append(f"{where}: MLflow only in {', '.join(MLFLOW_ROOMS)} below floor {RAY_FLOOR}")
    return problems


def test_no_module_imports_a_higher_floor():
    floors = declared_floors(ARCHITECTURE.read_text())
    assert violations(PACKAGE, floors) == []


def test_every_room_of_the_table_exists():
    for room in declared_floors(ARCHITECTURE.read_text()):
        assert (PACKAGE / room).exists(), f"docs/architecture.md names {room}, which platform/topro lacks"


@pytest.mark.parametrize("body, found", [
    ("def f():\n    from pkg.top import x\n", "low.py:2 (floor 1) imports pkg.top (floor 2)"),
    ("import ray\n", "low.py:1 (floor 1) imports ray: Ray only from floor 5"),
    ("class A:\n    def f(self):\n        import mlflow\n", "low.py:3 (floor 1) imports mlflow: MLflow only"),
    ("from pkg import top\n", "low.py:1 (floor 1) imports pkg.top (floor 2)"),
])
def test_a_planted_upward_import_is_found(tmp_path, body, found):
    """The checker itself: an upward import, function-local or at the top, and Ray/MLflow below their floor."""
    root = tmp_path / "pkg"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "top.py").write_text("from pkg import low\n")  # downward: allowed
    (root / "low.py").write_text(body)
    floors = declared_floors("## Floors\n| floor | rooms | what |\n| --- | --- | --- |\n"
                             "| 1. ground | `__init__.py`, `low.py` | x |\n| 2. top | `top.py` | y |\n")
    problems = violations(root, floors)
    assert len(problems) == 1 and problems[0].startswith(found), problems


def test_no_import_cycle():
    """``scripts/import_cycles.py`` finds none (there was one of eight modules, function-local imports counted)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("import_cycles", REPO / "scripts" / "import_cycles.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    edges = tool.graph(PACKAGE)
    assert tool.cycles(edges) == []
    assert tool.cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]  # the tool finds one
