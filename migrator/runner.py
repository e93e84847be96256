"""Alembic verbs on one target database: upgrade, downgrade, current, pending, sql_preview.

Each verb is one short function over Alembic's nouns (``ScriptDirectory``,
``EnvironmentContext`` around ``env.py``, ``MigrationContext``) and returns a dataclass. The live
connection reaches ``env.py`` through ``Config.attributes["connection"]`` (Alembic's cookbook
recipe); no URL is ever rendered and parsed again.

Alembic is not thread-safe: ``alembic.context`` and ``alembic.op`` are module-level proxies, and
two runs in two threads of one process corrupt each other (``KeyError: 'config'``). A module-level
lock therefore serializes every verb within a process. Parallelism comes from processes
(django-q2 workers, a process pool), never from threads.

What this needs of Alembic beyond its public API (the plan of a run, env.py compiled once, the
version table read once) is in ``migrator.alembic_internals``; what it keeps per process (the
script directories read, that lock) is owned by ``migrator.process``.

A run, for one target:

1. opens one connection (``migrator.engines.connect``) and reads ``alembic_version``, without
   any lock: a target that is already at the requested revision costs one query and no lock
   (skipped when the caller expects work, ``upgrade(expect_pending=True)``: step 2 reads it);
2. otherwise takes the target-level lock (``migrator.locks``: ``pg_advisory_lock``,
   ``GET_LOCK``, ``sp_getapplock`` or a lock file), waiting up to MIGRATION_LOCK_TIMEOUT seconds
   (``TargetLocked`` after that), and reads ``alembic_version`` again under it (another run may
   have done the work meanwhile);
3. runs ``env.py``, where Alembic applies what is still pending from there, one transaction per
   revision, so a failing revision leaves the target at the last revision that completed;
4. closes the connection, which releases the lock (so does the database if the connection dies).
"""

import ast
import io
import logging
import os
import re
import sys
import threading
import time
import traceback
import types
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from django.conf import settings
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from migrator import alembic_internals, engines, locks, process, providers
from migrator.exceptions import (
    EnvPyContract,
    LockTimeout,
    MigrationError,
    MigrationFailed,
    MigratorError,
    MultipleHeads,
    RevisionNotFound,
    ScriptDirectoryUnreadable,
)
from migrator.targets import Target

if TYPE_CHECKING:
    from migrator.verify import Verification

logger = logging.getLogger("migrator.runner")

UPGRADE = "upgrade"
DOWNGRADE = "downgrade"

_alembic_lock = threading.Lock()
# Alembic's default version table (env.py keeps it), in the default schema.
_VERSION_TABLE = "alembic_version"
_SELECT_VERSIONS = "SELECT version_num FROM alembic_version"


@dataclass
class RunResult:
    """What one upgrade or downgrade did to one target.

    Revisions are Alembic revision ids; ``None`` means an empty database (base), and several
    heads are joined with ``,``. ``applied`` lists the revisions applied (for a downgrade: the
    revisions reverted) in the order they ran.
    """

    target: str
    kind: str  # "upgrade" or "downgrade"
    revision_before: str | None = None
    revision_after: str | None = None
    applied: list[str] = field(default_factory=list)
    duration_ms: int = 0
    log: list[str] = field(default_factory=list)
    # What checking the schema after an upgrade found, set by ``migrator.pipeline``; None when
    # it was not checked.
    verification: "Verification | None" = None
    # The head revision(s) of the script directory the run ran against (as on disk when it
    # started), for the record to say whether the target is up to date.
    heads: tuple[str, ...] = ()


@dataclass(frozen=True)
class RevisionState:
    """Where one target stands, next to the heads of the script directory."""

    target: str
    revisions: tuple[str, ...]  # as recorded in the target's alembic_version; () when empty
    heads: tuple[str, ...]  # of the script directory
    applied: frozenset = field(default=frozenset(), repr=False)  # revisions at or below them

    @property
    def revision(self) -> str | None:
        return _as_revision(self.revisions)

    @property
    def up_to_date(self) -> bool:
        """Every head is applied (``up_to_date``)."""
        return up_to_date(self.heads, self.applied or self.revisions)


def up_to_date(heads, applied) -> bool:
    """Is a target that has ``applied`` these revisions (its ``alembic_version`` and every
    revision below them) up to date with ``heads``? When every head is applied: alembic_version
    may list one revision that depends on the other heads, as a contract revision depends on its
    expand revision. The one definition; ``tenants`` shows it as the status "up to date"."""
    return set(heads) <= set(applied)


def elapsed_ms(started: float) -> int:
    """Milliseconds since ``started`` (a ``time.monotonic()``)."""
    return int((time.monotonic() - started) * 1000)


@dataclass(frozen=True)
class PendingResult:
    """The revisions an upgrade of one target to ``destination`` would apply, in order."""

    target: str
    current: str | None
    destination: str
    revisions: list[str]

    @property
    def count(self) -> int:
        return len(self.revisions)


@dataclass(frozen=True)
class SqlPreview:
    """The SQL an upgrade from ``from_revision`` (None: an empty database) to ``to_revision``
    would run on a database of ``dialect`` (Alembic's offline mode, no connection)."""

    dialect: str
    from_revision: str | None
    to_revision: str
    revisions: list[str]
    sql: str


# --- Verbs ------------------------------------------------------------------------------------


def upgrade(
    target: Target,
    revision: str = "head",
    *,
    script_location=None,
    then=None,
    expect_pending=False,
) -> RunResult:
    """Upgrade ``target`` to ``revision`` ("head", a revision id, or relative like "+1").

    Takes the target-level lock only when something is pending. Raises a ``MigratorError``
    subclass carrying the partial ``RunResult`` as ``.result``: ``MigrationFailed`` when a
    revision raised (the target stays at the last revision that completed), ``TargetLocked``,
    ``DatabaseUnreachable``, ``DatabaseAuthFailed``, ``RevisionNotFound``, ``MultipleHeads``.

    ``then(connection, result)``, when given, is called after an upgrade that applied
    something, on the run's own connection (no second login), outside the Alembic lock, with the
    target lock still held (it goes with the connection); the pipeline verifies the schema
    there. What it raises propagates.

    ``expect_pending``: the caller expects work (the control plane's record says the target is
    behind), so the lock is taken first and ``alembic_version`` read once, under it; without
    it, a first read without the lock lets a target already at ``revision`` go without one.
    Either way what runs is decided by the read under the lock.
    """
    return _run(target, UPGRADE, revision, script_location, then, read_first=not expect_pending)


def downgrade(target: Target, revision: str, *, script_location=None) -> RunResult:
    """Downgrade ``target`` to ``revision`` (a revision id, "base", or relative like "-1").

    Same locking, result and errors as ``upgrade``.
    """
    return _run(target, DOWNGRADE, revision, script_location)


def current(target: Target, *, script_location=None) -> RevisionState:
    """Read the revision(s) recorded in ``target``'s ``alembic_version`` table (no lock)."""
    with _alembic_lock:
        script = script_directory(script_location)
        with _database_errors(target), engines.connect(target) as connection:
            revisions = _read_revisions(connection)
        try:
            applied = frozenset(r.revision for r in script.iterate_revisions(revisions, "base"))
        except Exception:  # noqa: BLE001 - a revision this code does not know
            applied = frozenset()
        return RevisionState(target.name, revisions, tuple(script.get_heads()), applied)


def pending(target: Target, revision: str = "head", *, script_location=None) -> PendingResult:
    """The revisions ``upgrade(target, revision)`` would apply now, in order (no lock)."""
    with _alembic_lock:
        script = script_directory(script_location)
        with _database_errors(target), engines.connect(target) as connection:
            revisions = _read_revisions(connection)
        revision = resolve_destination(script, UPGRADE, revision)
        steps = _plan(script, UPGRADE, revision, revisions)
        return PendingResult(
            target.name, _as_revision(revisions), revision, [_step_id(step) for step in steps]
        )


def sql_preview(
    target_or_provider: Target | str,
    from_rev: str | None = None,
    to_rev: str = "head",
    *,
    kind: str = "upgrade",
    script_location=None,
) -> SqlPreview:
    """The SQL of an upgrade (or, with ``kind="downgrade"``, a downgrade) from ``from_rev``
    (None: an empty database) to ``to_rev``, rendered by Alembic's offline mode for the dialect
    of a target or of a provider name or alias (``migrator.providers``: "postgresql",
    "mysql" or "mariadb", "sqlserver" or "mssql", "sqlite"). Needs no connection."""
    provider = providers.get(
        target_or_provider.provider
        if isinstance(target_or_provider, Target)
        else target_or_provider
    )
    dialect = provider.dialects[0]
    with _alembic_lock:
        script = script_directory(script_location)
        to_rev = resolve_destination(script, kind, to_rev)
        planned: list[str] = []

        def steps(revisions, context):
            found = _plan(script, kind, to_rev, revisions)
            planned.extend(_step_id(step) for step in found)
            return found

        buffer = io.StringIO()
        config = _config(script, output_buffer=buffer, dialect_name=dialect)
        # For an env.py whose offline mode reads sqlalchemy.url (as `alembic init` writes it):
        # the dialect and driver only, no host, no user, no password.
        config.set_main_option("sqlalchemy.url", f"{provider.drivername}://")
        with EnvironmentContext(
            config,
            script,
            fn=steps,
            as_sql=True,
            starting_rev=from_rev,
            destination_rev=to_rev,
        ):
            _run_env(script)
        return SqlPreview(dialect, from_rev, to_rev, planned, buffer.getvalue())


def resolve_destination(script: ScriptDirectory, kind: str, destination: str) -> str:
    """ "head" means every head when the script directory's heads are all on labelled branches
    (the expand/contract pattern); an unlabelled fork stays an error (``MultipleHeads``)."""
    if kind != UPGRADE or destination != "head":
        return destination
    heads = script.get_heads()
    if len(heads) > 1 and all(script.get_revision(h).branch_labels for h in heads):
        return "heads"
    return destination


@dataclass(frozen=True)
class StepsDone:
    """How much of a run's plan a database shows done (``steps_done``)."""

    planned: list[str]  # the revisions the run was to apply (revert), in order
    done: list[str]  # those the database shows applied (reverted), in order

    @property
    def complete(self) -> bool:
        return len(self.done) == len(self.planned)


def steps_done(
    kind: str,
    revision_before: str | None,
    destination: str,
    revision_now: str | None,
    *,
    script_location=None,
) -> StepsDone:
    """Which revisions of a run from ``revision_before`` to ``destination`` a database that
    stands at ``revision_now`` shows done (revision strings as recorded: "a,b" for several
    heads, None or "" for base). Reads no database: for a run whose outcome was never recorded
    (its worker died, or could not reach the control plane), after its revision was read back.
    Raises ``MigrationError`` (or a subclass) when the revisions are not in the directory."""
    before = tuple(r for r in (revision_before or "").split(",") if r)
    now = tuple(r for r in (revision_now or "").split(",") if r)
    with _alembic_lock:
        script = script_directory(script_location)
        destination = resolve_destination(script, kind, destination)
        planned = [_step_id(step) for step in _plan(script, kind, destination, before)]
        try:
            at_now = {r.revision for r in script.iterate_revisions(now, "base")} if now else set()
        except Exception as exc:  # noqa: BLE001 - Alembic's errors for an unknown revision
            raise RevisionNotFound(
                f"The database is at {revision_now}, which the script directory "
                f"({script.dir}) does not know: {exc}"
            ) from None
    if kind == UPGRADE:
        done = [revision for revision in planned if revision in at_now]
    else:
        done = [revision for revision in planned if revision not in at_now]
    return StepsDone(planned, done)


def planned(
    kind: str, revisions: tuple[str, ...], destination: str, *, script_location=None
) -> list[str]:
    """The revisions a run of ``kind`` from ``revisions`` (as a database records them) to
    ``destination`` would apply (revert), in the order they would run. Reads no database.
    Raises ``RevisionNotFound``, ``MultipleHeads`` or ``MigrationError`` as the run would."""
    with _alembic_lock:
        script = script_directory(script_location)
        destination = resolve_destination(script, kind, destination)
        return [_step_id(step) for step in _plan(script, kind, destination, revisions)]


def heads(*, script_location=None) -> tuple[str, ...]:
    """The head revision(s) of the script directory."""
    with _alembic_lock:
        return tuple(script_directory(script_location).get_heads())


# --- The script directory, as it is on disk ---------------------------------------------------


@dataclass
class _Loaded:
    """One script directory as this process read it, and the disk it was read from."""

    script: ScriptDirectory
    fingerprint: tuple
    env_code: types.CodeType | None = None
    env_problem: str = ""  # what env.py lacks for a run (``_check_env_py``); "" when nothing


class _ScriptDirectories:
    """The script directories this process has read, checked against the disk before each use.

    Reading a script directory (every revision file imported into Alembic's revision map) and
    compiling env.py costs more than a small run (bench/README.md), so it is done once per process
    and location, and ``qcluster`` does it before forking its workers (``preload``). What a
    long-running process read is only trusted while the disk still says the same: every use
    compares a fingerprint of the directory (the name, size and modification time of env.py and
    of each file under ``versions/``, a few ``stat`` calls) with the one taken when it was read,
    and reads the directory again when they differ. A revision deployed, changed or removed while
    the workers run is therefore seen by the next run, without a restart.
    """

    def __init__(self):
        self._loaded: dict[str, _Loaded] = {}
        self._lock = threading.Lock()

    def get(self, location: str) -> _Loaded:
        fingerprint = _fingerprint(location)
        with self._lock:
            loaded = self._loaded.get(location)
            if loaded is not None and loaded.fingerprint == fingerprint:
                return loaded
            if loaded is not None:
                logger.info("The script directory %s changed on disk; reading it again", location)
                _forget_modules_under(location)
            config = Config()
            config.set_main_option("script_location", location)
            loaded = _Loaded(_read_revisions_of(config, location), fingerprint)
            env_py = Path(location) / "env.py"
            if env_py.exists():
                source = env_py.read_bytes()
                loaded.env_code = compile(source, str(env_py), "exec")
                loaded.env_problem = _check_env_py(env_py, source)
            self._loaded[location] = loaded
            return loaded

    def env_code(self, script: ScriptDirectory) -> types.CodeType | None:
        """env.py as compiled when ``script`` was read, without looking at the disk again: a
        run's env.py and revisions come from the same read."""
        loaded = self._loaded_as(script)
        if loaded is not None:
            return loaded.env_code
        env_py = Path(script.dir) / "env.py"
        return compile(env_py.read_bytes(), str(env_py), "exec") if env_py.exists() else None

    def env_problem(self, script: ScriptDirectory) -> str:
        """What the env.py read with ``script`` lacks for a run ("" when nothing)."""
        loaded = self._loaded_as(script)
        if loaded is not None:
            return loaded.env_problem
        env_py = Path(script.dir) / "env.py"
        return _check_env_py(env_py, env_py.read_bytes()) if env_py.exists() else ""

    def _loaded_as(self, script: ScriptDirectory) -> _Loaded | None:
        with self._lock:
            loaded = self._loaded.get(_location(script.dir))
        return loaded if loaded is not None and loaded.script is script else None

    def reset(self) -> None:
        with self._lock:
            self._loaded.clear()

    def fresh_lock(self) -> None:
        self._lock = threading.Lock()


_scripts = _ScriptDirectories()


def _read_revisions_of(config: Config, location: str) -> ScriptDirectory:
    """The ``ScriptDirectory`` with every revision file imported into its map now, so that a
    file that cannot be imported is said here, naming it, for every caller alike."""
    script = ScriptDirectory.from_config(config)
    try:
        script.revision_map.heads  # noqa: B018 - imports every revision file
    except Exception as exc:  # noqa: BLE001 - a revision's own module code: any error
        raise ScriptDirectoryUnreadable(_unreadable(location, exc)) from exc
    return script


def _unreadable(location: str, error: Exception) -> str:
    """What cannot be read in the script directory, which file, and what to do."""
    root = os.path.join(location, "")
    culprit = getattr(error, "filename", None) if isinstance(error, SyntaxError) else None
    for frame in traceback.extract_tb(error.__traceback__):
        if os.path.abspath(frame.filename).startswith(root):
            culprit = f"{frame.filename}, line {frame.lineno}"
    where = f"{culprit} raised" if culprit else "reading it raised"
    message = (
        f"The script directory {location} cannot be read: {where} "
        f"{type(error).__name__}: {error}. Nothing ran."
    )
    if isinstance(error, ImportError):
        message += (
            " The control plane imports every revision file (in the web and worker processes, "
            "to know the heads) before any env.py runs, so a module a revision imports must be "
            "importable there: put its directory on PYTHONPATH for the web and worker processes "
            "(or install it in their environment); a sys.path change in env.py comes too late."
        )
    return message + " Fix it and deploy: the next run reads the directory again"


def _fingerprint(location: str) -> tuple:
    """Names, sizes and modification times of env.py and of every file under versions/ (the
    bytecode caches aside): what changes when revisions are deployed, edited or removed."""
    found = []
    for path in (Path(location) / "env.py", Path(location) / "script.py.mako"):
        try:
            stat = path.stat()
        except OSError:
            continue
        found.append((path.name, stat.st_size, stat.st_mtime_ns))
    for folder, directories, files in os.walk(Path(location) / "versions"):
        directories[:] = sorted(d for d in directories if d != "__pycache__")
        for name in sorted(files):
            try:
                stat = os.stat(os.path.join(folder, name))
            except OSError:  # removed while we looked: the next look sees it gone
                continue
            found.append((os.path.join(folder, name), stat.st_size, stat.st_mtime_ns))
    return tuple(found)


def _forget_modules_under(location: str) -> None:
    """Drop from ``sys.modules`` what was imported from the script directory (helpers that
    revisions import), so the next read runs the code now on disk. Not when the directory holds
    the control plane's own code (a script directory at or above BASE_DIR): that stays."""
    root = os.path.join(location, "")
    if os.path.join(str(Path(settings.BASE_DIR).resolve()), "").startswith(root):
        return
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and os.path.abspath(file).startswith(root):
            del sys.modules[name]


# What the control plane hands env.py, and what it needs back: README, "Bringing your own
# Alembic project".
_CONTRACT = (
    "The control plane passes each run the target's connection, already locked and configured, "
    "in config.attributes['connection']: env.py must configure Alembic with that connection "
    "when it is there (context.configure(connection=config.attributes['connection'], ...)), "
    "and open its own only otherwise (the plain alembic command). See 'Bringing your own "
    "Alembic project' in the README."
)
_OWN_CONNECTION_CALLS = ("engine_from_config", "async_engine_from_config", "create_engine")


def _check_env_py(path: Path, source: bytes) -> str:
    """What env.py lacks for a run, in plain words ("" when nothing is seen missing), read from
    its source when the script directory is read: an env.py that opens its own connection
    (``engine_from_config``, ``create_engine``, as the one ``alembic init`` writes) and never
    looks at ``config.attributes`` would migrate without the target's lock and settings, or
    fail on the ``sqlalchemy.url`` it does not have. An env.py that delegates (``runpy``) is
    judged when it runs (``_environment``)."""
    try:
        tree = ast.parse(source, str(path))
    except SyntaxError:
        return ""  # compiling it raises the same error, with its line
    names = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    names |= {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    opens = sorted(names & set(_OWN_CONNECTION_CALLS))
    if opens and "attributes" not in names:
        return (
            f"{path} opens a connection of its own ({', '.join(opens)}, from sqlalchemy.url) "
            f"and never reads config.attributes, so it cannot migrate a target. {_CONTRACT}"
        )
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.keyword)
            and node.arg == "transaction_per_migration"
            and isinstance(node.value, ast.Constant)
            and node.value.value is False
        ):
            logger.warning(
                "%s sets transaction_per_migration=False: a failing revision takes the whole "
                "run back with it (where the database's DDL is transactional), and the record "
                "says so",
                path,
            )
    return ""


def check_env_py(script_location=None) -> str:
    """What the script directory's env.py lacks for a run, in plain words ("" when nothing is
    seen missing), from its source alone (reads no revision): for the system checks."""
    env_py = Path(_location(script_location)) / "env.py"
    try:
        return _check_env_py(env_py, env_py.read_bytes())
    except OSError:
        return ""


def _location(script_location=None) -> str:
    return str(Path(script_location or settings.TENANT_MIGRATIONS_DIR).resolve())


def script_directory(script_location=None) -> ScriptDirectory:
    """The ``ScriptDirectory`` at ``script_location`` (default: TENANT_MIGRATIONS_DIR), as it is
    on disk now: read once per process and kept while the disk does not change (see
    ``_ScriptDirectories``); Alembic keeps its revision map in memory. Inside ``one_read``, as
    it was at the block's first use."""
    pinned = _pinned.get()
    if pinned is None:
        return _scripts.get(_location(script_location)).script
    key = script_location or settings.TENANT_MIGRATIONS_DIR
    if key not in pinned:
        pinned[key] = _scripts.get(_location(script_location)).script
    return pinned[key]


# The script directories of the ``one_read`` block under way: {location as given: script}.
_pinned: ContextVar[dict | None] = ContextVar("pinned_scripts", default=None)


@contextmanager
def one_read() -> Iterator[None]:
    """Check the disk once per script directory for the block (one run): its plan, its heads,
    its phases and its verification's reference then come from the same read, and the run
    looks at the disk once instead of at each of them. The next block looks again, so a deploy
    is still seen by the next run."""
    if _pinned.get() is not None:
        yield
        return
    token = _pinned.set({})
    try:
        yield
    finally:
        _pinned.reset(token)


def _fresh_locks() -> None:
    # In a forked child: a thread of the parent may have held them at the fork, and nothing in
    # the child would ever release them. The script directories read stay (``preload``).
    global _alembic_lock
    _alembic_lock = threading.Lock()
    _scripts.fresh_lock()


process.register("runner.scripts", reset=_scripts.reset, after_fork=_fresh_locks)


def preload(script_location=None) -> None:
    """Read the script directory's revisions and compile env.py now: ``qcluster`` calls it
    before forking its workers, which then share them instead of each reading them on its
    first run (and again after each recycle). A worker still checks the disk before each run."""
    with _alembic_lock:
        script_directory(script_location).get_heads()  # loads every revision into the map


def _run_env(script: ScriptDirectory) -> None:
    """Run the script directory's ``env.py`` from the code compiled when ``script`` was read
    (once per process: ``_ScriptDirectories``)."""
    alembic_internals.run_env(script, _scripts.env_code(script))


def _config(script: ScriptDirectory, output_buffer=None, **attributes) -> Config:
    # A Config per run, because it carries the run's connection to env.py. It reads no file, so
    # building it costs nothing; what is worth caching is the ScriptDirectory.
    config = Config(output_buffer=output_buffer)
    config.attributes = _Attributes(attributes)
    config.set_main_option("script_location", script.dir)
    return config


class _Attributes(dict):
    """``Config.attributes`` of one run: remembers whether env.py took the connection."""

    connection_taken = False

    def __getitem__(self, key):
        if key == "connection":
            self.connection_taken = True
        return super().__getitem__(key)

    def get(self, key, default=None):
        if key == "connection":
            self.connection_taken = True
        return super().get(key, default)


# --- One run ----------------------------------------------------------------------------------


class _Run:
    """The log lines, timing and progress of one upgrade or downgrade."""

    def __init__(self, target: Target, kind: str):
        self.target = target
        self.kind = kind
        self.started = time.monotonic()
        self.result = RunResult(target=target.name, kind=kind)
        self.running: str | None = None  # the revision being applied right now
        # Revisions that ran but were rolled back with a later one (one transaction for all).
        self.taken_back: list[str] = []

    def say(self, message: str, level=logging.INFO) -> None:
        logger.log(level, "%s", message)
        self.result.log.append(message)

    def stood(self, revisions: tuple[str, ...], *, before=False) -> None:
        if before:
            self.result.revision_before = _as_revision(revisions)
        self.result.revision_after = _as_revision(revisions)

    def finish(self) -> RunResult:
        self.result.duration_ms = elapsed_ms(self.started)
        return self.result


def _run(
    target: Target, kind: str, destination: str, script_location, then=None, read_first=True
) -> RunResult:
    name = target.name
    run = _Run(target, kind)
    with ExitStack() as open_connection:
        with _failed_run(run), _database_errors(target):
            connection = open_connection.enter_context(engines.connect(target))
            with _alembic_lock:
                script = script_directory(script_location)
                run.result.heads = tuple(script.get_heads())
                problem = _scripts.env_problem(script)
                if problem:
                    raise EnvPyContract(f"Nothing ran on {name}: {problem}")
                destination = resolve_destination(script, kind, destination)
                if kind == UPGRADE:
                    run.say(f"Starting migration for tenant {name}")
                else:
                    run.say(f"Starting downgrade to {destination} for tenant {name}")
                pending = True  # to be read under the lock
                if read_first:
                    revisions = _read_revisions(connection)
                    run.stood(revisions, before=True)
                    pending = bool(_plan(script, kind, destination, revisions))
                if pending:
                    _apply(run, script, connection, destination)
                else:
                    run.say(_found_line(kind, 0, name))
        result = run.finish()
        verb = "applied" if kind == UPGRADE else "reverted"
        run.say(
            f"Successfully {verb} {len(result.applied)} migrations for tenant {name} "
            f"in {result.duration_ms}ms"
        )
        if then is not None and result.applied:
            then(connection, result)
    return result


@contextmanager
def _failed_run(run: _Run) -> Iterator[None]:
    """Log a failed run's last line and hang its partial result on the exception."""
    try:
        yield
    except MigratorError as exc:
        failed = f" at revision {run.running}" if run.running else ""
        noun = "Migration" if run.kind == UPGRADE else "Downgrade"
        run.say(f"{noun} failed for tenant {run.target.name}{failed}: {exc}", logging.ERROR)
        exc.result = run.finish()
        raise


def _apply(run: _Run, script: ScriptDirectory, connection: Connection, destination: str) -> None:
    """Lock the target and run env.py on ``connection``; Alembic re-reads the version under the
    lock and applies what is still pending."""

    def steps(revisions, context):
        # Alembic asks for the steps with the revisions read under the lock, and runs each step
        # (its own transaction, committed) before asking for the next one.
        run.stood(revisions, before=True)
        planned = _plan(script, run.kind, destination, revisions)
        run.say(_found_line(run.kind, len(planned), run.target.name))
        for step in planned:
            run.running = _step_id(step)
            yield step
            run.result.applied.append(run.running)
            run.running = None

    applied_heads = []

    def on_version_apply(*, heads, **_):
        # Called by Alembic inside each revision's transaction, after it stamped the version.
        applied_heads.append(tuple(heads))

    with locks.target_lock(
        connection,
        timeout=settings.MIGRATION_LOCK_TIMEOUT,
        target_name=run.target.name,
        session_settings=engines.session_settings(connection),
        released_with_connection=True,  # _run closes the connection right after the run
    ):
        found = _read_version_table(connection)
        run.stood(found.revisions, before=True)
        config = _config(script, connection=connection, on_version_apply=on_version_apply)
        try:
            with (
                _alembic_log_into(run.result.log),
                _environment(config, script, found, fn=steps, destination_rev=destination),
            ):
                _run_env(script)
        except Exception as exc:
            stands_now = _read_revisions_after(connection)
            if stands_now is not None:
                run.stood(stands_now)
                kept = _committed(script, run.kind, run.result.applied, stands_now)
                run.taken_back = [r for r in run.result.applied if r not in kept]
                run.result.applied = kept
            if isinstance(exc, MigratorError):
                raise
            if not config.attributes.connection_taken:
                raise EnvPyContract(
                    f"Nothing ran on {run.target.name}: env.py failed before it took the "
                    f"connection the control plane passed it "
                    f"({type(exc).__name__}: {engines.error_reason(exc, run.target.connection)}). "
                    f"{_CONTRACT}"
                ) from exc
            raise _failure(run, stands_now, exc) from exc
        if applied_heads and len(applied_heads) == len(run.result.applied):
            # Every revision committed: the heads after the last one are where it stands.
            run.stood(applied_heads[-1])
        elif run.result.applied:
            # An env.py that does not pass on_version_apply on: ask the database.
            run.stood(_read_revisions(connection))


def _environment(
    config: Config, script: ScriptDirectory, found: "_VersionTable", **kwargs
) -> EnvironmentContext:
    """Alembic's environment for one run on the run's connection, whose ``configure`` (called by
    env.py) also hands the migration context what the run read from ``alembic_version`` under
    the target lock (``found``)."""
    ours = dict.get(config.attributes, "connection")

    def configure_and_tell(configure, *args, **kw):
        # What a run needs of Alembic whatever env.py passes (README, "Bringing your own
        # Alembic project"): one transaction per revision unless env.py says otherwise, so that
        # a failing revision leaves the target at the last one that completed; and the run's
        # callback following the heads.
        kw.setdefault("transaction_per_migration", True)
        if "on_version_apply" not in kw and "on_version_apply" in config.attributes:
            kw["on_version_apply"] = config.attributes["on_version_apply"]
        configure(*args, **kw)
        context = made.get_context()
        if ours is not None and not context.as_sql and context.connection is not ours:
            raise EnvPyContract(
                "Nothing ran: env.py configured Alembic with a connection of its own instead of "
                f"the one in config.attributes['connection']. {_CONTRACT}"
            )
        alembic_internals.share_version_table(context)
        if context.connection is ours and found.exists is not None:
            alembic_internals.answer_version_read(
                context, found.revisions, found.exists, _VERSION_TABLE
            )

    made = alembic_internals.environment(config, script, configure_and_tell, **kwargs)
    return made


def _failure(run: _Run, stands_now: tuple[str, ...] | None, error: Exception) -> MigrationError:
    """The exception for an error raised while Alembic ran, with where the target stands now.

    Its first line is the summary; the error's further lines (PostgreSQL's DETAIL, the rows a
    revision's own message lists) follow it, whole.
    """
    reason = engines.error_reason(error, run.target.connection)
    details = engines.error_details(error, run.target.connection)
    if run.running is None:
        return MigrationError(
            _with_details(f"Migrating {run.target.name} failed: {reason}", details)
        )
    stands = _describe(stands_now)
    verb = "Applying" if run.kind == UPGRADE else "Reverting"
    waited = engines.lock_wait(error)
    if waited is not None:
        return _lock_timeout(run, stands_now, verb, waited)
    message = (
        f"{verb} revision {run.running} failed on {run.target.name}: {reason}. "
        f"The database stands at {stands}, the last revision that completed"
    )
    if run.taken_back:
        message += (
            f" ({', '.join(run.taken_back)} ran before it in the same transaction, as env.py "
            "asks with transaction_per_migration=False, and were rolled back with it)"
        )
    provider = providers.get(run.target.provider)
    if not provider.transactional_ddl:
        message += (
            f". {provider.partial_ddl}, so {run.running} may be "
            f"partly applied: compare the schema with what {run.running} does, undo the steps "
            "that went through, then run the migration again."
        )
    else:
        message += f"; nothing of {run.running} was kept. Fix the revision, then run it again."
    return MigrationFailed(
        _with_details(message, details),
        failed_revision=run.running,
        current_revision=_as_revision(stands_now),
    )


def _with_details(summary: str, details: str) -> str:
    return f"{summary}\n{details}" if details else summary


def _lock_timeout(run: _Run, stands_now, verb: str, waited) -> LockTimeout:
    """The retryable error of a revision that gave up waiting for another session's lock."""
    table = f"table `{waited.table}`" if waited.table else "a table of its statement"
    provider = providers.get(run.target.provider)
    message = (
        f"{verb} revision {run.running} on {run.target.name} waited {waited.waited} for "
        f"{provider.waited_lock} "
        f"on {table} held by another session (an open application transaction?) and gave up "
        f"({waited.setting}), so that the application's queries on it were not queued behind "
        f"the migration. The database stands at {_describe(stands_now)}"
    )
    if not provider.transactional_ddl:
        message += (
            f". {provider.partial_ddl}: if {run.running} does more before this statement, that "
            f"part is applied. Find the session {provider.find_session}; the run is tried again"
        )
    else:
        message += (
            f"; nothing of {run.running} was kept. Find the session {provider.find_session}; "
            "the run is tried again"
        )
    message += (
        f" after a back-off (or run it again at a quieter time); raise {waited.setting} only if "
        "the application can wait that long."
    )
    return LockTimeout(
        message, failed_revision=run.running, current_revision=_as_revision(stands_now)
    )


def _found_line(kind: str, count: int, name: str) -> str:
    if kind == UPGRADE:
        return f"Found {count} pending migrations for tenant {name}"
    return f"Found {count} migrations to revert for tenant {name}"


# --- Revisions --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _VersionTable:
    """What one read of ``alembic_version`` found: its revisions, and whether the table exists
    (None: not known, when Alembic's own read answered)."""

    revisions: tuple[str, ...]
    exists: bool | None


def _read_revisions(connection: Connection) -> tuple[str, ...]:
    """The revisions in ``alembic_version`` (empty when the table does not exist yet). Leaves
    the connection outside any transaction."""
    return _read_version_table(connection).revisions


def _read_version_table(connection: Connection) -> _VersionTable:
    """Read ``alembic_version``; leaves the connection outside any transaction.

    One query when the table exists (every run after a target's first); when that query fails,
    the driver's error says whether the table is missing, or Alembic's own read (which asks the
    catalog first) says it or raises the real error (no privilege, connection lost).
    """
    if connection.in_transaction():
        connection.rollback()
    # In autocommit where that is free (PostgreSQL): the read is one round trip, not three.
    with providers.autocommit(connection):
        try:
            revisions = connection.exec_driver_sql(_SELECT_VERSIONS).scalars().all()
        except sa_exc.DBAPIError as exc:
            if exc.connection_invalidated:
                raise
            connection.rollback()
            if _no_such_table(exc):
                return _VersionTable((), exists=False)  # a database no revision was applied to
            revisions = MigrationContext.configure(connection).get_current_heads()
            connection.rollback()
            return _VersionTable(tuple(revisions), exists=None)
        connection.rollback()
    return _VersionTable(tuple(revisions), exists=True)


def _no_such_table(error: sa_exc.DBAPIError) -> bool:
    """Does the driver's error say the table does not exist (PostgreSQL's undefined_table, MySQL's
    ER_NO_SUCH_TABLE)? Then a new database needs no catalog query to say so; anything else (no
    privilege, another error) goes to Alembic's own read, which raises it."""
    original = error.orig
    if getattr(original, "sqlstate", None) == "42P01":
        return True
    args = getattr(original, "args", ())
    return bool(args) and args[0] == 1146


def _read_revisions_after(connection: Connection) -> tuple[str, ...] | None:
    # After a failure the connection itself may be gone: then where the target stands is unknown.
    try:
        return _read_revisions(connection)
    except sa_exc.DBAPIError:
        return None


def _plan(script: ScriptDirectory, kind: str, destination: str, revisions: tuple[str, ...]):
    """Alembic's steps from ``revisions`` to ``destination``, in the order they would run."""
    with _revision_errors(script, revisions, destination):
        return alembic_internals.plan(script, kind == UPGRADE, destination, revisions)


def _committed(
    script: ScriptDirectory, kind: str, applied: list[str], stands: tuple[str, ...]
) -> list[str]:
    """Of the revisions a failed run applied (reverted), those the database shows committed at
    ``stands``: with one transaction for the whole run, a failure takes back the ones before it
    too, and the record must not list them."""
    try:
        at = {r.revision for r in script.iterate_revisions(stands, "base")} if stands else set()
    except Exception:  # noqa: BLE001 - a revision this code does not know: keep what ran
        return applied
    if kind == UPGRADE:
        return [revision for revision in applied if revision in at]
    return [revision for revision in applied if revision not in at]


_step_id = alembic_internals.step_revision


@contextmanager
def _revision_errors(
    script: ScriptDirectory, revisions: tuple[str, ...], destination: str
) -> Iterator[None]:
    """Map Alembic's revision errors to the engine's exceptions, with what to do."""
    heads = ", ".join(script.get_heads()) or "none"
    try:
        yield
    except CommandError as exc:
        cause = exc.__cause__
        if isinstance(cause, alembic_internals.MultipleHeads):
            raise MultipleHeads(
                f"The script directory has several heads ({', '.join(cause.heads)}) and "
                f"{cause.argument!r} names none of them in particular: ask for 'heads' to "
                "upgrade every branch, or for one of those revisions."
            ) from None
        if isinstance(cause, alembic_internals.ResolutionError):
            if cause.argument in revisions:
                raise RevisionNotFound(
                    f"The database is at revision {cause.argument}, which the script directory "
                    f"({script.dir}) does not have: deploy the code that has it (head here: "
                    f"{heads})."
                ) from None
            raise RevisionNotFound(
                f"Unknown revision {cause.argument!r}: the script directory ({script.dir}) has "
                f"head {heads}. Ask for 'head', a revision id, 'base', or a relative one such "
                "as '-1'."
            ) from None
        if re.fullmatch(r"[-+]\d+", destination.split("@")[-1]):
            direction = "below" if "-" in destination else "above"
            raise MigrationError(
                f"Cannot go to {destination!r}: the database stands at {_describe(revisions)}, and "
                f"there are not that many revisions {direction} it (head: {heads})."
            ) from None
        raise MigrationError(
            f"{exc} (the database is at {_describe(revisions)}; head: {heads})"
        ) from None


@contextmanager
def _database_errors(target: Target) -> Iterator[None]:
    """Driver errors outside of a revision (reading alembic_version, taking the lock)."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        reason = engines.error_reason(exc, target.connection)
        details = engines.error_details(exc, target.connection)
        raise MigrationError(
            _with_details(f"Database error on {target.name}: {reason}", details)
        ) from None


def _as_revision(revisions) -> str | None:
    if not revisions:
        return None
    return ",".join(sorted(revisions))  # several heads: one spelling, whatever the row order


def _describe(revisions) -> str:
    if revisions is None:
        return "an unknown revision (the connection was lost)"
    return _as_revision(revisions) or "base (no revision applied)"


# --- Alembic's own log lines ------------------------------------------------------------------

_ALEMBIC_LOGGER = "alembic.runtime.migration"

# The log of the run this thread (or task) is executing, if any.
_run_log: ContextVar[list[str] | None] = ContextVar("_run_log", default=None)


class _Collect(logging.Handler):
    """Alembic's migration logger's one handler, put in place once per process: copies each
    record into the log of the run executing (``_run_log``), and passes on to the usual
    handlers only the records the logging configuration lets through (the project sets
    ``alembic`` to WARNING), as it says at the time of the record."""

    def __init__(self, parent: logging.Logger):
        super().__init__(logging.INFO)
        self.parent = parent

    def emit(self, record: logging.LogRecord) -> None:
        lines = _run_log.get()
        if lines is not None:
            lines.append(record.getMessage())
        if self.parent.isEnabledFor(record.levelno):
            self.parent.handle(record)


_collector: _Collect | None = None
_configured: tuple[int, bool] | None = None  # the logger's level and propagate before it


def _collecting(alembic_logger: logging.Logger) -> None:
    """Let Alembic's INFO lines through to ``_Collect``, once: ``Logger.setLevel`` clears the
    cached levels of every logger of the process (hundreds in a worker), which cost a run
    about half a millisecond when it was set and restored around each one. Done again if a
    logging configuration (``dictConfig``) has reset the logger since."""
    global _collector, _configured
    if (
        _collector in alembic_logger.handlers
        and alembic_logger.level == logging.INFO
        and not alembic_logger.propagate
    ):
        return
    if _collector is not None:
        alembic_logger.removeHandler(_collector)
    else:
        _configured = alembic_logger.level, alembic_logger.propagate
    _collector = _Collect(alembic_logger.parent)
    alembic_logger.addHandler(_collector)
    alembic_logger.setLevel(logging.INFO)
    alembic_logger.propagate = False


def _stop_collecting() -> None:
    """Give Alembic's migration logger back its own level and propagation (``process.reset()``)."""
    global _collector, _configured
    if _collector is None:
        return
    alembic_logger = logging.getLogger(_ALEMBIC_LOGGER)
    alembic_logger.removeHandler(_collector)
    alembic_logger.setLevel(_configured[0])
    alembic_logger.propagate = _configured[1]
    _collector = _configured = None


process.register("runner.alembic_log", reset=_stop_collecting)


@contextmanager
def _alembic_log_into(lines: list[str]) -> Iterator[None]:
    """Collect Alembic's INFO lines ("Running upgrade a -> b") into ``lines`` for the block."""
    _collecting(logging.getLogger(_ALEMBIC_LOGGER))
    token = _run_log.set(lines)
    try:
        yield
    finally:
        _run_log.reset(token)
