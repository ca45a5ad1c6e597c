"""The import rules of docs/DESIGN.md, read from the source (every import statement, module-level
or inside a function): kernels never imports the engine; the engine's rooms import only the rooms
below them; no module imports, directly or around a circle, a module that imports it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"engine": "weightstream.engine", "kernels": "weightstream.kernels", "weightstream": "weightstream"}

# The engine's rooms, lowest first: a room may import kernels, errors and any room before it.
ROOMS = ["errors", "formats", "model", "stream", "observe", "runtime", "tools", "serve", "cli"]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".pyx"):
                found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project's modules that `name` imports (a package's own __init__ counts as the package)."""
    if path.suffix == ".pyx":
        return set()  # compiled kernels import only C and NumPy
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                full = f"{target}.{alias.name}"
                out.add(full if full in known else target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return {m for m in out if m in known and m != name}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def room_of(name: str) -> str | None:
    parts = name.split(".")
    return parts[2] if len(parts) > 2 and parts[1] == "engine" else None


def test_kernels_never_import_the_engine():
    bad = sorted((a, b) for a, targets in graph().items() for b in targets
                 if a.startswith("weightstream.kernels") and b.startswith("weightstream.engine"))
    assert bad == []


def test_rooms_import_only_rooms_below():
    bad = []
    for a, targets in graph().items():
        ra = room_of(a)
        if ra not in ROOMS:
            continue
        for b in targets:
            rb = room_of(b)
            if rb in ROOMS and ROOMS.index(rb) > ROOMS.index(ra):
                bad.append(f"{a} -> {b}")
    assert bad == [], "imports up the stack:\n" + "\n".join(sorted(bad))


def test_every_engine_module_is_in_a_room():
    loose = sorted(n for n in graph() if n.startswith("weightstream.engine.")
                   and room_of(n) not in ROOMS and n != "weightstream.engine.__main__")
    assert loose == []


def test_no_import_circles():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert circles == []


def test_the_rules_see_real_imports():
    """The checker itself: it finds the engine's use of the kernels and of its lower rooms."""
    edges = graph()
    assert "weightstream.kernels" in edges["weightstream.engine.model.forward"]
    assert "weightstream.engine.formats.gguf_file" in edges["weightstream.engine.runtime.engine"]
    assert "weightstream.engine.runtime.engine" in edges["weightstream.engine.cli.demo"]  # inside a function
