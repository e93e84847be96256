"""Every use of Alembic's private API, in one place, and the Alembic versions it was tested on.

Alembic's public API (``alembic.command``) runs one target per call, reads its Config from a file,
opens its own connection and plans from the database it reads. A control plane that migrates
a fleet from worker processes needs more: the plan of a run before it runs (previews, the
record's "pending"), a run on a connection it already locked, env.py compiled once per process,
and no catalog query for what the run has just read under its lock. Those rely on names Alembic
does not promise to keep; each function below says which, and why it is worth it. No other
module of ``migrator`` touches a private name of Alembic (tests/test_alembic_internals.py).

The functions were tested on the Alembic versions in ``TESTED`` (pyproject.toml pins the same
range). ``version_problem`` says when the installed one is outside it: a Django system check
(``controlplane.W013``) and the ``qcluster`` preload report it at start-up.
"""

import types
from collections.abc import Callable
from pathlib import Path

import alembic
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.script import revision as _revision

from migrator import process

# The Alembic versions this module was tested on: (lowest, first one not tested). The whole suite
# passed on 1.20.1; tests/test_runner.py, test_own_env.py, test_rollback_phases.py and
# test_alembic_internals.py on 1.13.3 and 1.16.5. Keep in step with pyproject.toml.
TESTED = ((1, 13), (1, 21))

# Alembic's revision errors, raised as the ``__cause__`` of its ``CommandError`` when a
# destination names several heads or a revision the script directory does not have. They live
# in ``alembic.script.revision``, which the documentation lists as internals.
MultipleHeads = _revision.MultipleHeads
ResolutionError = _revision.ResolutionError


def installed_version() -> str:
    """The installed Alembic's version string (``alembic.__version__``)."""
    return alembic.__version__


def version_problem(version: str | None = None) -> str:
    """What is wrong with running on Alembic ``version`` (default: the installed one): "" when
    it is within ``TESTED``, else a sentence naming the version and the tested range."""
    version = version or installed_version()
    try:
        parts = tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        parts = None
    if parts is not None and TESTED[0] <= parts < TESTED[1]:
        return ""
    return (
        f"Alembic {version} is installed; the control plane was tested on Alembic "
        f"{tested_range()}, and uses parts of it that Alembic does not promise to keep "
        "(migrator/alembic_internals.py). Install a version in that range (pip install "
        f"'alembic{tested_range()}'), or test this one and widen TESTED there and in "
        "pyproject.toml."
    )


def tested_range() -> str:
    """``TESTED`` as a requirement specifier, e.g. ">=1.13,<1.21"."""
    low, high = TESTED
    return f">={low[0]}.{low[1]},<{high[0]}.{high[1]}"


# --- Planning ---------------------------------------------------------------------------------


def plan(script: ScriptDirectory, upgrade: bool, destination: str, revisions: tuple[str, ...]):
    """Alembic's migration steps from ``revisions`` (the heads a database records) to
    ``destination``, in the order they would run (raises ``CommandError`` as Alembic's commands
    do for an unknown or ambiguous destination).

    Private: ``ScriptDirectory._upgrade_revs`` / ``_downgrade_revs``, what ``alembic.command``
    hands env.py as its ``fn``. Using them for previews and for the run itself keeps the
    control plane's plan the same as what Alembic runs."""
    if upgrade:
        return script._upgrade_revs(destination, revisions)
    return script._downgrade_revs(destination, revisions)


def step_revision(step) -> str:
    """The revision id of one step of ``plan`` (its ``RevisionStep.revision.revision``;
    ``RevisionStep`` is not part of Alembic's documented API)."""
    return step.revision.revision


# --- Running env.py ---------------------------------------------------------------------------


def run_env(script: ScriptDirectory, code: types.CodeType | None) -> None:
    """Run the script directory's env.py from ``code`` (compiled once per process), as
    ``ScriptDirectory.run_env`` does from the file; without ``code`` (a deployment with env.pyc
    only), Alembic's own ``run_env``.

    Relies on how Alembic runs env.py (``alembic.util.pyfiles.load_python_file``): as a fresh
    module named ``env_py`` whose ``__file__`` is the env.py path. Alembic compiles the file
    again for every run wherever no bytecode is cached (PYTHONDONTWRITEBYTECODE, which container
    images often set, or a read-only tree)."""
    if code is None:
        script.run_env()
        return
    module = types.ModuleType("env_py")
    module.__file__ = str(Path(script.dir) / "env.py")
    exec(code, module.__dict__)  # noqa: S102 - the project's own env.py, as Alembic runs it


def environment(
    config, script: ScriptDirectory, around_configure: Callable, **kwargs
) -> EnvironmentContext:
    """Alembic's ``EnvironmentContext`` for one run, whose ``configure`` (what env.py calls as
    ``context.configure(...)``) is ``around_configure(configure, *args, **kwargs)``: the run
    adds its defaults and looks at the migration context env.py made.

    Relies on ``alembic.context`` proxying to the EnvironmentContext instance in force, so that
    a ``configure`` set on the instance is the one env.py calls. Set on the instance, not in a
    subclass: Alembic's module proxies are made for EnvironmentContext itself."""
    made = EnvironmentContext(config, script, **kwargs)
    configure = made.configure

    def configure_around(*args, **kw):
        return around_configure(configure, *args, **kw)

    made.configure = configure_around
    return made


# --- The version table ------------------------------------------------------------------------


def answer_version_read(
    context: MigrationContext, revisions: tuple[str, ...], exists: bool, version_table: str
) -> None:
    """Let ``context`` take its current heads from ``revisions`` (what the run read from
    ``alembic_version`` under the target lock; ``exists``: whether the table exists) instead of
    from the database, once; any later question goes to the database.

    Alembic asks the catalog whether ``alembic_version`` exists before it reads the table, and
    asks again before it creates it in a new database: two catalog queries per run that cost a
    new PostgreSQL backend more than the revision's own statements (bench/README.md). Left alone
    where the run did not read what Alembic would (another version table or schema, offline
    SQL), or where Alembic has not the private parts it relies on.

    Private: ``MigrationContext._ensure_version_table`` (replaced on the instance) and
    ``MigrationContext._version`` (the version Table)."""
    if (
        context.as_sql
        or context.version_table != version_table
        or context.version_table_schema is not None
        or not hasattr(context, "_ensure_version_table")
        or getattr(context, "_version", None) is None
    ):
        return
    unread = [revisions]

    def get_current_heads():
        if unread:
            return unread.pop()
        return MigrationContext.get_current_heads(context)

    def ensure_version_table(purge=False):
        if purge or unread:
            MigrationContext._ensure_version_table(context, purge)
        elif not exists:
            # In the first revision's transaction, as Alembic creates it.
            context._version.create(context.connection)

    context.get_current_heads = get_current_heads
    context._ensure_version_table = ensure_version_table


_version_tables: dict[tuple, object] = {}


def share_version_table(context: MigrationContext) -> None:
    """Give ``context`` this process's ``alembic_version`` Table for its dialect, name and schema.

    Alembic builds a new Table for every run, and SQLAlchemy keys compiled statements by the
    Table object itself, so the INSERT and UPDATE of the version bookkeeping were compiled anew
    for every revision of every run (a few milliseconds of each run). With one Table per process
    they come from the engine's statement cache. Same structure: it is what the dialect's
    ``version_table_impl`` builds for the same arguments.

    Private: ``MigrationContext._version``."""
    table = getattr(context, "_version", None)
    if table is None:  # not an Alembic this was written for: leave it alone
        return
    key = (
        type(context.impl),
        table.name,
        table.schema,
        tuple(c.name for c in table.columns),
        tuple(table.primary_key.columns.keys()),
    )
    context._version = _version_tables.setdefault(key, table)


# Plain Table metadata, no connection: a forked worker keeps the parent's.
process.register("alembic_internals.version_tables", reset=_version_tables.clear)
