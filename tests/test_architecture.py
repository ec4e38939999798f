"""The layout is the architecture: rules read off the source, so a change that breaks
one fails here, naming the module and the line.

The package is every module under ``ledger/`` and ``projections/`` (``bench/``,
``tests/`` and ``migrations/`` are not part of it). Each rule is checked by
walking the modules' syntax trees; nothing is imported.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("ledger", "projections")


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    tree: ast.Module

    @property
    def is_package(self) -> bool:
        return self.path.name == "__init__.py"

    @property
    def rel(self) -> str:
        return str(self.path.relative_to(ROOT))


@cache
def modules() -> dict[str, Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            name = ".".join(parts)
            found[name] = Module(name, path, ast.parse(path.read_text(), str(path)))
    return found


def _absolute(module: Module, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.name.split(".")
    if not module.is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: Module) -> list[tuple[str, str | None, int]]:
    """``(imported module, imported name or None, line)`` for every import, lazy ones included."""
    out = []
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            out += [(source, alias.name, node.lineno) for alias in node.names]
    return out


def internal_edges(module: Module) -> set[str]:
    """The package's modules ``module`` imports (``from pkg import submodule`` is the submodule)."""
    known, edges = modules(), set()
    for source, name, _ in imports(module):
        if name is not None and f"{source}.{name}" in known:
            edges.add(f"{source}.{name}")
        elif source in known:
            edges.add(source)
    edges.discard(module.name)
    return edges


def import_cycles() -> list[list[str]]:
    """Every strongly connected group of two or more modules (Tarjan), as sorted names."""
    graph = {name: internal_edges(m) for name, m in modules().items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return sorted(cycles)


def test_no_import_cycles_among_the_packages_modules():
    """Lazy imports inside functions count: a cycle they hide is still one to untangle."""
    assert import_cycles() == []


# -- argument parsing ---------------------------------------------------------------------

PARSERS = ("argparse", "click", "optparse", "getopt")


def test_argument_parsing_only_in_the_cli_package():
    found = [
        f"{m.rel}:{line} imports {source}"
        for m in modules().values()
        if not m.name.startswith("ledger.cli")
        for source, _, line in imports(m)
        if source.split(".")[0] in PARSERS
    ]
    assert found == []


# -- each database's SQL in the module named for it ------------------------------------------

#: The modules a database's statements, settings, locks and wake-ups live in.
DATABASE_MODULES = {"ledger.store.postgres", "ledger.store.sqlite"}
#: Drivers and SQLAlchemy's dialect packages: only the database's own module imports them.
DATABASE_IMPORTS = ("sqlalchemy.dialects", "psycopg", "sqlite3")
#: Text that is one database's SQL (PostgreSQL functions, casts and commands, SQLite's
#: pragmas and catalogue, an upsert's syntax), in code strings (docstrings excluded).
DATABASE_SQL = re.compile(
    r"\bpg_\w+\(|::[a-z]\w*|\bPRAGMA\b|\bsqlite_\w+|\bLISTEN\b|\bNOTIFY\b|\bCOPY\b|\bSET LOCAL\b"
    r"|\bSET TRANSACTION\b|\bLOCK TABLE\b|\bBEGIN IMMEDIATE\b|\bON CONFLICT\b|\bhashtext\w*\(",
)
#: Exceptions, each with its reason:
#: - ``ledger.store``: picks a database's module by the engine's backend name;
#: - ``ledger.store.engine``: checks and normalizes URLs by their backend name;
#: - ``ledger.store.schema``: dialect options of a table (``postgresql_where``,
#:   ``sqlite_autoincrement``, a SQLite column variant): one model for every database,
#:   which Alembic compares with each.
BACKEND_NAMES = {"ledger.store", "ledger.store.engine"}
DIALECT_OPTIONS = {"ledger.store.schema"}


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def database_specific(module: Module) -> list[str]:
    """Where ``module`` names a database: its driver, its SQL, its dialect or backend name."""
    found = []
    docstrings = _docstrings(module.tree)
    for source, _, line in imports(module):
        if source.startswith(DATABASE_IMPORTS):
            found.append(f"{module.rel}:{line} imports {source}")
    for node in ast.walk(module.tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Attribute) and node.attr == "dialect" and module.name not in BACKEND_NAMES:
            found.append(f"{module.rel}:{line} reads .dialect")
        elif (isinstance(node, ast.Attribute) and node.attr == "get_backend_name"
              and module.name not in BACKEND_NAMES):
            found.append(f"{module.rel}:{line} reads the backend name")
        elif (isinstance(node, ast.keyword) and node.arg
              and node.arg.startswith(("postgresql_", "sqlite_")) and module.name not in DIALECT_OPTIONS):
            found.append(f"{module.rel}:{line} passes the dialect option {node.arg}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str)
              and id(node) not in docstrings and (match := DATABASE_SQL.search(node.value))):
            if module.name in DIALECT_OPTIONS and _in_dialect_option(module.tree, node):
                continue
            found.append(f"{module.rel}:{line} has SQL of one database: {match.group(0)!r}")
    return found


def _in_dialect_option(tree: ast.AST, constant: ast.Constant) -> bool:
    return any(
        isinstance(k, ast.keyword) and k.arg and k.arg.startswith(("postgresql_", "sqlite_"))
        and any(n is constant for n in ast.walk(k.value))
        for k in ast.walk(tree)
    )


def test_each_databases_sql_only_in_the_module_for_that_database():
    found = [
        problem
        for m in modules().values()
        if m.name not in DATABASE_MODULES
        for problem in database_specific(m)
    ]
    assert found == []


def test_the_rule_sees_the_database_modules_own_sql():
    """The check above finds what it looks for: each database's module is full of it."""
    for name in DATABASE_MODULES:
        assert database_specific(modules()[name]), name


# -- public names across modules ----------------------------------------------------------------


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(module: Module) -> list[str]:
    """Private names ``module`` takes from another module of the package: imported by
    name, or read as an attribute of an imported module."""
    known = modules()
    found = [
        f"{module.rel}:{line} imports {source}.{name}"
        for source, name, line in imports(module)
        if name is not None and _private(name) and source.split(".")[0] in PACKAGES
    ]
    aliases = {}
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    aliases[alias.asname or alias.name] = f"{source}.{alias.name}"
    for node in ast.walk(module.tree):
        if (isinstance(node, ast.Attribute) and _private(node.attr)
                and isinstance(node.value, ast.Name) and node.value.id in aliases
                and aliases[node.value.id] != module.name):
            found.append(f"{module.rel}:{node.lineno} reads {aliases[node.value.id]}.{node.attr}")
    return found


def test_no_private_name_imported_across_modules():
    found = [problem for m in modules().values() for problem in private_imports(m)]
    assert found == []
