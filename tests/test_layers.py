"""The package's layers, read from its source with ``ast`` (nothing is imported).

- No import cycle among conec_trio's modules. Every import counts: at the top, inside a
  function (a lazy import only hides a cycle), under ``if TYPE_CHECKING:`` (the module still
  depends on the other one), and ``importlib.import_module("literal")``.
- aioquic is imported only in ``conec_trio/_quic/``, the one package that speaks QUIC.
- ``conec_trio/_wire/`` (sans-IO) never imports trio.
- No module is longer than MAX_LINES lines.

Each failure lists every offending import or module as ``path:line: what``. The first tests
check the checker itself on small made-up packages, so that a rule that finds nothing in the
real package is known to be able to find something.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "conec_trio"
QUIC_DIR = "conec_trio/_quic"  # the only place aioquic may be imported
WIRE_DIR = "conec_trio/_wire"  # sans-IO: never trio
MAX_LINES = 450


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the importing module
    target: str  # dotted name of the imported module (ours or another distribution's)
    path: Path  # the importing file
    line: int
    lazy: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:``

    def where(self, root: Path) -> str:
        return f"{self.path.relative_to(root).as_posix()}:{self.line}"

    def how(self) -> str:
        notes = [
            n
            for n, on in (("inside a function", self.lazy), ("TYPE_CHECKING", self.type_only))
            if on
        ]
        return f" ({', '.join(notes)})" if notes else ""


@dataclass(repr=False)
class Package:
    root: Path  # the directory holding the package directory
    modules: dict[str, Path]  # dotted name -> file
    imports: list[Import]

    def __repr__(self) -> str:
        return f"<Package of {len(self.modules)} modules under {self.root}>"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Collector(ast.NodeVisitor):
    """Every import statement of one module, with where it sits."""

    def __init__(self, name: str, is_package: bool) -> None:
        # The package that relative imports start from.
        self.base = name if is_package else name.rpartition(".")[0]
        self.found: list[tuple[str, list[str], int, bool, bool]] = []  # module, names, ...
        self._functions = 0
        self._type_checking = 0

    def _add(self, module: str, names: list[str], line: int) -> None:
        self.found.append((module, names, line, self._functions > 0, self._type_checking > 0))

    def _resolve(self, module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        base = self.base.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, module] if module else base)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, [], node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        module = self._resolve(node.module, node.level)
        self._add(module, [a.name for a in node.names], node.lineno)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__") and node.args:
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str):
                text = first.value
                level = len(text) - len(text.lstrip("."))
                self._add(self._resolve(text[level:] or None, level), [], node.lineno)
        self.generic_visit(node)

    def _in_function(self, node: ast.AST) -> None:
        self._functions += 1
        self.generic_visit(node)
        self._functions -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _in_function

    def visit_If(self, node: ast.If) -> None:
        if is_type_checking(node.test):
            self._type_checking += 1
            for child in node.body:
                self.visit(child)
            self._type_checking -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)


def scan(root: Path, package: str) -> Package:
    """Read every module of ``package`` (a directory under ``root``) and its imports."""
    files = sorted((root / package).rglob("*.py"))
    modules = {module_name(root, f): f for f in files}
    imports: list[Import] = []
    for name, path in modules.items():
        collector = _Collector(name, path.name == "__init__.py")
        collector.visit(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        # Packages this module sits in: importing them again is no dependency.
        own = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        for module, names, line, lazy, type_only in collector.found:
            # ``from P import m`` of a submodule m depends on P.m; of a plain name, on P.
            named = [f"{module}.{n}" for n in names if f"{module}.{n}" in modules]
            targets = named or [module]
            if len(named) < len(names):
                targets = [*named, module]
            for target in dict.fromkeys(targets):
                parts = target.split(".")
                # Importing a.b.c runs a and a.b first: those count unless already ours.
                chain = [".".join(parts[:i]) for i in range(1, len(parts))]
                for dep in [*(p for p in chain if p in modules and p not in own), target]:
                    if dep != name:
                        imports.append(Import(name, dep, path, line, lazy, type_only))
    return Package(root, modules, imports)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: the components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def import_cycles(package: Package) -> list[str]:
    """One entry per cycle: its modules, then every import between them (each lies on a
    cycle) with file and line."""
    graph: dict[str, set[str]] = {name: set() for name in package.modules}
    for imp in package.imports:
        if imp.target in package.modules:
            graph[imp.importer].add(imp.target)
    reports = []
    for component in _strongly_connected(graph):
        members = set(component)
        lines = [
            f"  {imp.where(package.root)}: {imp.importer} imports {imp.target}{imp.how()}"
            for imp in package.imports
            if imp.importer in members and imp.target in members
        ]
        reports.append(f"import cycle among {', '.join(component)}:\n" + "\n".join(lines))
    return reports


def imports_of(package: Package, library: str) -> Iterator[Import]:
    for imp in package.imports:
        if imp.target == library or imp.target.startswith(library + "."):
            yield imp


def _inside(imp: Import, package: Package, directory: str) -> bool:
    return imp.path.is_relative_to(package.root / directory)


def misplaced_imports(package: Package, library: str, only_in: str) -> list[str]:
    """Imports of ``library`` from files outside the directory ``only_in``."""
    return [
        f"{imp.where(package.root)}: {imp.importer} imports {imp.target}{imp.how()}, "
        f"which only {only_in}/ may"
        for imp in imports_of(package, library)
        if not _inside(imp, package, only_in)
    ]


def forbidden_imports(package: Package, library: str, within: str) -> list[str]:
    """Imports of ``library`` from files in the directory ``within``."""
    return [
        f"{imp.where(package.root)}: {imp.importer} imports {imp.target}{imp.how()}, "
        f"which {within}/ must not"
        for imp in imports_of(package, library)
        if _inside(imp, package, within)
    ]


def long_modules(package: Package, limit: int) -> list[str]:
    reports = []
    for path in package.modules.values():
        count = len(path.read_text(encoding="utf-8").splitlines())
        if count > limit:
            where = f"{path.relative_to(package.root).as_posix()}:{limit + 1}"
            reports.append(f"{where}: {count} lines, over the {limit} a module may have")
    return reports


def check(rule: str, offences: list[str]) -> None:
    """Fail naming the rule and listing every offence (no assertion rewriting noise)."""
    if offences:
        pytest.fail(f"{rule}: {len(offences)} offence(s)\n" + "\n".join(offences), pytrace=False)


# --- the checker, on made-up packages ---------------------------------------------------------


def make_package(root: Path, files: dict[str, str]) -> Package:
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return scan(root, "pkg")


def test_checker_finds_cycles_through_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    package = make_package(
        tmp_path,
        {
            "pkg/__init__.py": "from .a import A\n",
            "pkg/a.py": "from . import b\nA = 1\n",
            "pkg/b.py": "def f():\n    from .c import C\n    return C\n",
            "pkg/c.py": "import typing\nif typing.TYPE_CHECKING:\n    from .a import A\n",
            "pkg/sub/__init__.py": "",
            "pkg/sub/d.py": "from .. import a\nimport pkg.sub\nimport importlib\n",
            "pkg/sub/e.py": "from ..a import A\n",
            "pkg/f.py": "import importlib\nimportlib.import_module('.sub.g', __package__)\n",
            "pkg/sub/g.py": "from pkg import f\n",
        },
    )
    cycles = import_cycles(package)
    assert len(cycles) == 2, cycles
    abc, fg = sorted(cycles)
    assert abc.startswith("import cycle among pkg.a, pkg.b, pkg.c:")
    assert "pkg/a.py:1: pkg.a imports pkg.b" in abc
    assert "pkg/b.py:2: pkg.b imports pkg.c (inside a function)" in abc
    assert "pkg/c.py:3: pkg.c imports pkg.a (TYPE_CHECKING)" in abc
    # The package's own __init__ importing a is no cycle with a importing its siblings.
    assert "pkg/__init__" not in abc
    assert "pkg/f.py:2: pkg.f imports pkg.sub.g" in fg
    assert "pkg/sub/g.py:1: pkg.sub.g imports pkg.f" in fg


def test_checker_finds_library_imports_in_the_wrong_place(tmp_path: Path) -> None:
    package = make_package(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/_quic/__init__.py": "from aioquic.quic import connection\n",
            "pkg/_quic/_conn.py": "import aioquic\n",
            "pkg/_client.py": "import trio\n\n\ndef f():\n    import aioquic.tls\n",
            # A module named like the package is not in it.
            "pkg/_quic.py": "import aioquic\n",
            "pkg/_wire/__init__.py": "",
            "pkg/_wire/framing.py": "import struct\nfrom trio import lowlevel\n",
            "pkg/_wire/control.py": "import trio_websocket\n",
        },
    )
    assert misplaced_imports(package, "aioquic", "pkg/_quic") == [
        "pkg/_client.py:5: pkg._client imports aioquic.tls (inside a function), "
        "which only pkg/_quic/ may",
        "pkg/_quic.py:1: pkg._quic imports aioquic, which only pkg/_quic/ may",
    ]
    assert forbidden_imports(package, "trio", "pkg/_wire") == [
        "pkg/_wire/framing.py:2: pkg._wire.framing imports trio, which pkg/_wire/ must not"
    ]


def test_checker_finds_long_modules(tmp_path: Path) -> None:
    package = make_package(
        tmp_path, {"pkg/__init__.py": "x = 1\n" * 3, "pkg/short.py": "x = 1\n" * 2}
    )
    assert long_modules(package, 2) == ["pkg/__init__.py:3: 3 lines, over the 2 a module may have"]


# --- the rules, on conec_trio ------------------------------------------------------------------


@pytest.fixture(scope="module")
def conec() -> Package:
    return scan(REPO, PACKAGE)


def test_no_import_cycles(conec: Package) -> None:
    check("conec_trio modules import each other", import_cycles(conec))


def test_aioquic_is_imported_only_in_the_quic_package(conec: Package) -> None:
    check("aioquic outside conec_trio/_quic/", misplaced_imports(conec, "aioquic", QUIC_DIR))


def test_the_wire_layer_does_not_import_trio(conec: Package) -> None:
    check("trio in conec_trio/_wire/", forbidden_imports(conec, "trio", WIRE_DIR))


def test_modules_are_short(conec: Package) -> None:
    check(f"modules over {MAX_LINES} lines", long_modules(conec, MAX_LINES))
