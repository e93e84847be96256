"""Alembic's private API is used in one module, on the Alembic versions it was tested on."""

import ast
import inspect
import logging
import re
import sys
from pathlib import Path

import alembic
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, RevisionStep
from alembic.script import Script, ScriptDirectory
from alembic.script.revision import RevisionMap
from django.core import checks

from migrator import alembic_internals

MIGRATOR = Path(__file__).resolve().parent.parent / "migrator"
# The Alembic classes the engine handles, and what it must not reach into elsewhere.
ALEMBIC_CLASSES = (
    Config,
    EnvironmentContext,
    MigrationContext,
    RevisionStep,
    Script,
    ScriptDirectory,
    RevisionMap,
)
PRIVATE_MODULES = ("alembic.script.revision", "alembic.util.pyfiles")
REPLACED_METHODS = {"configure", "get_current_heads", "run_env"}


def alembic_private_names():
    """Every private attribute of those classes: defined on them, or set on their instances."""
    names = {
        name
        for cls in ALEMBIC_CLASSES
        for name in dir(cls)
        if name.startswith("_") and not name.startswith("__")
    }
    for module in {sys.modules[cls.__module__] for cls in ALEMBIC_CLASSES}:
        names |= set(re.findall(r"self\.(_[a-z]\w*)\s*[:=]", inspect.getsource(module)))
    return names


def touches(path, private):
    """What the module at ``path`` touches of Alembic's private API, as (line, what)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in private:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("alembic"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if alias.name.startswith("_") or full in PRIVATE_MODULES:
                    found.append((node.lineno, full))
                elif node.module in PRIVATE_MODULES:
                    found.append((node.lineno, full))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name in PRIVATE_MODULES]
        elif isinstance(node, ast.Assign):
            found += [
                (node.lineno, f"assigns .{target.attr}")
                for target in node.targets
                if isinstance(target, ast.Attribute) and target.attr in REPLACED_METHODS
            ]
    return found


def test_only_alembic_internals_touches_alembic_private_names():
    private = alembic_private_names()
    assert {"_upgrade_revs", "_ensure_version_table", "_version"} <= private  # the scan sees them
    assert touches(MIGRATOR / "alembic_internals.py", private)

    elsewhere = {
        path.name: found
        for path in sorted(MIGRATOR.glob("**/*.py"))
        if path.name != "alembic_internals.py" and (found := touches(path, private))
    }

    assert elsewhere == {}


def alembic_warnings():
    return [m for m in checks.run_checks(tags=["controlplane"]) if m.id == "controlplane.W013"]


def test_the_installed_alembic_is_one_the_control_plane_was_tested_on():
    assert alembic_warnings() == []
    low, high = alembic_internals.TESTED
    requirement = next(
        line.strip().strip('",')
        for line in (MIGRATOR.parent / "pyproject.toml").read_text().splitlines()
        if line.strip().startswith('"alembic')
    )
    assert requirement == f"alembic{alembic_internals.tested_range()}"


def test_an_alembic_outside_the_tested_range_is_named_at_start_up(monkeypatch, caplog):
    monkeypatch.setattr(alembic, "__version__", "1.12.1")

    [warning] = alembic_warnings()

    assert warning.level == checks.WARNING
    assert "Alembic 1.12.1 is installed" in warning.msg
    assert f"tested on Alembic {alembic_internals.tested_range()}" in warning.msg

    # The cluster says it too, in the workers' log, before it forks them.
    import gc

    from controlplane.apps import preload_worker_modules

    monkeypatch.setattr(alembic, "__version__", "2.0.0")
    with caplog.at_level(logging.WARNING, logger="controlplane"):
        try:
            preload_worker_modules()
        finally:
            gc.unfreeze()
    assert "Alembic 2.0.0 is installed" in caplog.text
