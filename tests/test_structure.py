"""The package's shape: no import cycle between files or packages of bench/, no file over 700 lines, and every bench
import inside a function outside the command line says why."""

from __future__ import annotations

import ast
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    out = {}
    for f in BENCH.rglob("*.py"):
        parts = list(f.relative_to(BENCH.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _edges(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> bench modules it imports (at any depth: an import inside a function closes a cycle too)."""

    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` depends on the submodule, not on everything pkg/__init__ re-exports.
                names = [
                    f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                    for a in node.names
                ]
            else:
                continue
            for n in names:
                o = owner(n) if n.startswith("bench") else None
                if o and o != m:
                    edges[m].add(o)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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


def test_no_import_cycle_between_files():
    assert _cycles(_edges(_modules())) == []


def test_no_import_cycle_between_packages():
    top = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    pk: dict[str, set[str]] = {}
    for m, ws in _edges(_modules()).items():
        for w in ws:
            if top(m) != top(w):
                pk.setdefault(top(m), set()).add(top(w))
    assert _cycles(pk) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_file_over_700_lines():
    long = {
        f.relative_to(BENCH).as_posix(): n
        for f in BENCH.rglob("*.py")
        if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert long == {}


def _deferred_bench_imports_without_reason(source: str) -> list[int]:
    """Lines of `from bench...`/`import bench...` statements inside a function that carry no comment saying why: none
    on the same line, none on the line above the run of import lines the statement belongs to."""
    lines = source.splitlines()

    def is_bench(node: ast.AST) -> bool:
        if isinstance(node, ast.Import):
            return any(a.name == "bench" or a.name.startswith("bench.") for a in node.names)
        return (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "bench"
        )

    def commented(node: ast.stmt) -> bool:
        if "#" in lines[node.lineno - 1]:
            return True
        i = node.lineno - 2
        while i >= 0 and lines[i].strip().startswith(("from ", "import ")):
            i -= 1
        return i >= 0 and lines[i].strip().startswith("#")

    bad = []
    for fn in ast.walk(ast.parse(source)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            bad += [n.lineno for n in ast.walk(fn) if is_bench(n) and not commented(n)]
    return sorted(set(bad))


def test_every_bench_import_inside_a_function_says_why():
    # docs/ARCHITECTURE.md "Where an import goes": outside the command line a bench module is imported inside a
    # function only when importing it at the top would load torch, or close a cycle; a comment says which.
    found = {
        f"{f.relative_to(BENCH.parent).as_posix()}:{n}"
        for f in BENCH.rglob("*.py")
        if "cli" not in f.relative_to(BENCH).parts
        for n in _deferred_bench_imports_without_reason(f.read_text(encoding="utf-8"))
    }
    assert found == set()


def test_the_deferred_import_check_finds_one_without_a_comment():
    src = (
        "from bench.io import read_json\n"
        "def a():\n    # torch: only when training\n    from bench.train import fit\n    from bench.models import embed\n"
        "def b():\n    from bench.io import write_json  # torch-free, but deferred\n"
        "def c():\n    x = 1\n    from bench.io import atomic_path\n"
        "def d():\n    import bench.tasks\n"
    )
    assert _deferred_bench_imports_without_reason(src) == [10, 12]
