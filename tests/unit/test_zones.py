"""The architecture's zones, checked by parsing every module's imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(60)

PACKAGE = Path(__file__).resolve().parents[2] / "sparkdl"
ZONES = {
    "[any]",
    "[driver]",
    "[task]",
    "[worker]",
    "[executor]",
    "[driver/executor]",
    "[driver+worker]",
}
# testing.py sets up Spark's process environment for local sessions (tests, notebooks, demo).
ENV_WRITERS = {"launch/rendezvous.py", "testing.py"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        yield path.relative_to(PACKAGE).as_posix(), tree


def _zone(tree: ast.Module) -> str:
    """The zone tag: the docstring's first word, or a ``Zone: [tag]`` line (the top-level
    package's docstring is what ``help(sparkdl)`` shows users, so it starts with prose)."""
    doc = ast.get_docstring(tree) or ""
    for line in doc.splitlines():
        if line.startswith("Zone: "):
            return line.split()[1]
    return doc.split()[0] if doc else ""


def _type_checking_only(tree: ast.Module) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (never executed at run time)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def _imports(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    skipped = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _eager_imports(tree: ast.Module) -> set[str]:
    """Modules a module imports when it is imported: module-level ``import``/``from`` statements
    and ``importlib.import_module("<literal>")`` calls, outside functions, classes and
    ``if TYPE_CHECKING:``."""
    names: set[str] = set()
    skipped = _type_checking_only(tree)
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if id(node) in skipped or isinstance(
            node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
        ):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func).endswith("import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            names.add(node.args[0].value)
        pending.extend(ast.iter_child_nodes(node))
    return names


def _module_name(rel: str) -> str:
    return "sparkdl." + rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


ALL = dict(_modules())
ZONE_OF = {_module_name(rel): _zone(tree) for rel, tree in ALL.items()}


@pytest.mark.parametrize("rel", sorted(ALL))
def test_every_module_names_its_zone_and_exports(rel):
    tree = ALL[rel]
    assert _zone(tree) in ZONES, f"{rel}: docstring must start with one of {sorted(ZONES)}"
    assigned = {
        t.id
        for n in tree.body
        if isinstance(n, (ast.Assign, ast.AnnAssign))
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        if isinstance(t, ast.Name)
    }
    assert "__all__" in assigned, f"{rel}: define __all__"


@pytest.mark.parametrize("rel", sorted(ALL))
def test_zone_rules(rel):
    tree = ALL[rel]
    zone, imports = _zone(tree), _imports(tree)
    if zone in ("[worker]", "[any]", "[driver+worker]"):
        assert not any(i == "pyspark" or i.startswith("pyspark.") for i in imports), (
            f"{rel} imports pyspark"
        )
        for name in imports:
            target = ZONE_OF.get(name)
            assert target in (None, "[worker]", "[any]", "[driver+worker]"), (
                f"{rel} ({zone}) imports {name} ({target})"
            )
    if zone == "[executor]":  # a Spark job's executor-side body: no torch, no driver code
        assert not any(i == "torch" or i.startswith("torch.") for i in imports), (
            f"{rel} imports torch"
        )
        for name in imports:
            target = ZONE_OF.get(name)
            assert target in (None, "[any]", "[executor]"), (
                f"{rel} ({zone}) imports {name} ({target})"
            )
    if zone in ("[driver]", "[driver+worker]"):
        assert not any(i.startswith("torch.distributed") for i in imports), (
            f"{rel} imports torch.distributed"
        )
    source = ast.unparse(tree)
    if rel != "launch/rendezvous.py":
        assert "BarrierTaskContext" not in source, (
            f"{rel}: only launch/rendezvous.py reads BarrierTaskContext"
        )
    if rel not in ENV_WRITERS:
        assert "os.environ" not in source and "getenv" not in source, (
            f"{rel}: env vars belong in rendezvous.py"
        )


@pytest.mark.parametrize("rel", sorted(rel for rel in ALL if ZONE_OF[_module_name(rel)] == "[any]"))
def test_any_modules_import_only_any_modules(rel):
    """An [any] module runs on the driver and in a worker alike, so it may lean on neither."""
    bad = sorted(
        f"{name} ({ZONE_OF[name]})"
        for name in _imports(ALL[rel])
        if ZONE_OF.get(name) not in (None, "[any]")
    )
    assert not bad, f"{rel} ([any]) imports {', '.join(bad)}"


DRIVER_ZONES = {"[driver]", "[driver/executor]"}


@pytest.mark.parametrize("rel", sorted(rel for rel in ALL if rel.endswith("__init__.py")))
def test_package_inits_load_no_driver_module_eagerly(rel):
    """Importing a package (as every import of one of its modules does) must not pull in its
    driver modules: re-export them lazily (a module ``__getattr__``), as sparkdl/__init__ does."""
    bad = sorted(
        f"{name} ({ZONE_OF[name]})"
        for name in _eager_imports(ALL[rel])
        if ZONE_OF.get(name) in DRIVER_ZONES
    )
    assert not bad, f"{rel} imports driver modules when imported: {', '.join(bad)}"


def test_worker_modules_load_without_pyspark():
    code = (
        "import sys; import sparkdl.train.worker, sparkdl.data.loader, sparkdl.sync;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'pyspark');"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_executor_modules_load_without_torch_or_pyspark():
    executor = [_module_name(rel) for rel in ALL if ZONE_OF[_module_name(rel)] == "[executor]"]
    code = (
        f"import sys; import {', '.join(executor)};"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pyspark'));"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
