"""The target-level migration lock: at most one migration run per target database at a time.

The lock lives on the target itself, so it holds between control planes, worker processes and a
migration author's ``alembic`` CLI (``tenant_migrations/env.py`` takes the same lock). Each
provider uses its own session-level lock, which the server releases by itself when the
connection dies, so a killed worker never leaves a target locked:

* PostgreSQL: ``pg_try_advisory_lock(key)``, and when another session holds it
  ``pg_advisory_lock(key)``, the wait bounded by ``lock_timeout``.
* MySQL/MariaDB: ``GET_LOCK(name, timeout)``.
* SQL Server: ``sp_getapplock`` with ``@LockOwner = 'Session'``.
* SQLite: an exclusive ``flock`` on a file next to the database (see ``_sqlite``).

This module needs no Django settings: the caller passes the timeout.
"""

import hashlib
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection

from migrator.exceptions import TargetLocked

try:
    import fcntl
except ImportError:  # Windows: a migration author's own machine, nothing to guard against.
    fcntl = None

LOCK_NAMESPACE = "tenant_migrations"

# pg_advisory_lock takes one bigint; derive it from the namespace so that it does not collide
# with advisory locks an application takes for its own purposes.
PG_LOCK_KEY = int.from_bytes(
    hashlib.sha256(LOCK_NAMESPACE.encode()).digest()[:8], "big", signed=True
)
_PG_LOCK_NOT_AVAILABLE = "55P03"
_MYSQL_MAX_LOCK_NAME = 64
_SQLITE_POLL_SECONDS = 0.1


@contextmanager
def target_lock(
    connection: Connection,
    *,
    timeout: float,
    target_name: str,
    session_settings: Mapping[str, str] | None = None,
    released_with_connection: bool = False,
) -> Iterator[None]:
    """Hold the migration lock of the database behind ``connection`` for the ``with`` block.

    Waits up to ``timeout`` seconds for a run elsewhere to finish, then raises ``TargetLocked``.
    Leaves ``connection`` outside any transaction both on entry to the block and on exit, so
    Alembic can open one transaction per revision.

    ``session_settings`` are set for the session: PostgreSQL's (``{"lock_timeout": "5s"}``) in
    the statement that takes the lock, MySQL's (``{"lock_wait_timeout": "5"}``) with a ``SET
    SESSION`` once it is held. With ``released_with_connection`` the block's end does not
    release the lock: the caller closes the connection right after, and the server releases a
    session-level lock with its session (a statement and a transaction fewer per run; the
    migration runner's connections are never pooled). A lock file (SQLite) is always
    released at the block's end.
    """
    dialect = connection.dialect.name
    if session_settings and dialect not in ("postgresql", "mysql", "mariadb"):
        raise ValueError(f"session settings are only set on PostgreSQL and MySQL, not {dialect}")
    take = _LOCKS.get(dialect, _no_lock)
    release = take(connection, timeout, session_settings or {})
    if release is None:
        raise TargetLocked(
            f"Target {target_name} is locked by another run (another worker, control plane or an "
            f"`alembic` command); waited {timeout:g}s. Try again once that run has finished."
        )
    connection.commit()
    if released_with_connection and dialect in _SESSION_LOCKS:
        release = None
    try:
        yield
    finally:
        try:
            # A failed revision may leave the connection in an aborted transaction.
            if connection.in_transaction():
                connection.rollback()
            if release is not None:
                release()
                connection.commit()
        except sa_exc.DBAPIError:
            # The connection is gone; the server released the session lock with it.
            pass


Release = Callable[[], None]


def _postgresql(
    connection: Connection, timeout: float, settings: Mapping[str, str]
) -> Release | None:
    # A session-level advisory lock outlives the per-revision transactions. Nobody else holds
    # it, the usual case: one statement takes it and sets the session's settings. Otherwise the
    # wait is bounded by lock_timeout rather than by polling pg_try_advisory_lock, so waiting
    # runs queue fairly.
    params = {"key": PG_LOCK_KEY}
    assignments = ""
    for index, (name, value) in enumerate(settings.items()):
        assignments += f", pg_catalog.set_config(:name{index}, :value{index}, false)"
        params[f"name{index}"], params[f"value{index}"] = name, str(value)
    got = connection.execute(
        text(f"SELECT pg_catalog.pg_try_advisory_lock(:key){assignments}"), params
    ).scalar()
    if not got and timeout > 0:
        # SET LOCAL: the bounded wait ends with this transaction, which target_lock commits (or
        # rolls back) right after; the session's own lock_timeout and statement_timeout are back
        # then. The statement timeout is off for the wait alone: lock_timeout bounds it.
        connection.execute(
            text(
                "SELECT pg_catalog.set_config('lock_timeout', :value, true), "
                "pg_catalog.set_config('statement_timeout', '0', true)"
            ),
            {"value": f"{math.ceil(timeout * 1000)}ms"},
        )
        try:
            connection.execute(
                text("SELECT pg_catalog.pg_advisory_lock(:key)"), {"key": PG_LOCK_KEY}
            )
        except sa_exc.OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != _PG_LOCK_NOT_AVAILABLE:
                raise
            connection.rollback()
            return None
        got = True
    if not got:
        return None
    return lambda: connection.execute(
        text("SELECT pg_catalog.pg_advisory_unlock(:key)"), {"key": PG_LOCK_KEY}
    )


def _mysql_lock_name(connection: Connection) -> str:
    # GET_LOCK names are server-wide, not per database: the name carries the database.
    database = connection.execute(text("SELECT DATABASE()")).scalar() or ""
    name = f"{LOCK_NAMESPACE}:{database}"
    if len(name) > _MYSQL_MAX_LOCK_NAME:
        name = f"{LOCK_NAMESPACE}:{hashlib.sha256(database.encode()).hexdigest()[:40]}"
    return name


# The MySQL/MariaDB session variables a migration sets (their names go into the SQL).
_MYSQL_SESSION_SETTINGS = ("lock_wait_timeout", "max_statement_time")


def _mysql(connection: Connection, timeout: float, settings) -> Release | None:
    unknown = set(settings) - set(_MYSQL_SESSION_SETTINGS)
    if unknown:
        raise ValueError(f"unknown MySQL session settings: {', '.join(sorted(unknown))}")
    name = _mysql_lock_name(connection)
    got = connection.execute(
        text("SELECT GET_LOCK(:name, :timeout)"),
        {"name": name, "timeout": max(0, math.ceil(timeout))},
    ).scalar()
    if got != 1:
        return None
    if settings:
        # Once the lock is held: the wait for it is bounded by its own timeout, not by
        # max_statement_time. Numbers, not strings: MySQL refuses a quoted numeric value.
        connection.execute(
            text("SET " + ", ".join(f"SESSION {name} = :{name}" for name in settings)),
            {
                name: float(value) if "." in str(value) else int(value)
                for name, value in settings.items()
            },
        )
    return lambda: connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})


def _mssql(connection: Connection, timeout: float, settings) -> Release | None:
    # Application locks are scoped to the current database; status 0 or 1 means granted.
    status = connection.execute(
        text(
            "SET NOCOUNT ON; DECLARE @status int; "
            "EXEC @status = sp_getapplock @Resource = :resource, @LockMode = 'Exclusive', "
            "@LockOwner = 'Session', @LockTimeout = :timeout_ms; "
            "SELECT @status"
        ),
        {"resource": LOCK_NAMESPACE, "timeout_ms": max(0, math.ceil(timeout * 1000))},
    ).scalar()
    if status is None or status < 0:
        return None
    return lambda: connection.execute(
        text("EXEC sp_releaseapplock @Resource = :resource, @LockOwner = 'Session'"),
        {"resource": LOCK_NAMESPACE},
    )


def _sqlite_lock_file(connection: Connection) -> str | None:
    database = connection.engine.url.database
    if fcntl is None or not database or database == ":memory:" or "mode=memory" in database:
        return None
    return f"{os.path.abspath(database)}.migration-lock"


def _sqlite(connection: Connection, timeout: float, settings) -> Release | None:
    # Not BEGIN EXCLUSIVE: with one transaction per revision that lock would end at the first
    # revision's COMMIT, and another run could start between two revisions. A lock file is held
    # for the whole run; SQLite databases are local files, so every process that can open the
    # database can see the lock. In-memory databases are private to their connection.
    path = _sqlite_lock_file(connection)
    if path is None:
        return _no_lock(connection, timeout, settings)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(_SQLITE_POLL_SECONDS)
        else:
            return lambda: os.close(fd)  # closing the descriptor releases the lock


def _no_lock(connection: Connection, timeout: float, settings) -> Release:
    # Dialects without a lock here (none that the control plane supports) run unguarded.
    return lambda: None


_LOCKS = {
    "postgresql": _postgresql,
    "mysql": _mysql,
    "mariadb": _mysql,
    "mssql": _mssql,
    "sqlite": _sqlite,
}
# Locks the server holds for the session and releases when the session ends.
_SESSION_LOCKS = {"postgresql", "mysql", "mariadb", "mssql"}


def is_held(connection: Connection) -> bool:
    """Does some session hold the migration lock of the database behind ``connection`` now?

    Asked without taking the lock, so a run starting at that moment is never kept out:
    PostgreSQL's ``pg_locks`` (the advisory lock's row in this database), MySQL/MariaDB's
    ``IS_USED_LOCK``, SQL Server's ``APPLOCK_TEST``, SQLite's lock file (a non-blocking
    ``flock``, let go at once). Recovery asks this before it declares a silent run dead: a
    session that still holds the lock belongs to a run that is alive, or to another migration of
    that database.
    """
    dialect = connection.dialect.name
    if dialect == "postgresql":
        unsigned = PG_LOCK_KEY & 0xFFFFFFFFFFFFFFFF
        return bool(
            connection.execute(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_locks l "
                    "JOIN pg_catalog.pg_database d ON d.oid = l.database "
                    "WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 "
                    "AND d.datname = pg_catalog.current_database() "
                    "AND l.classid::bigint = :high AND l.objid::bigint = :low)"
                ),
                {"high": unsigned >> 32, "low": unsigned & 0xFFFFFFFF},
            ).scalar()
        )
    if dialect in ("mysql", "mariadb"):
        name = _mysql_lock_name(connection)
        holder = connection.execute(text("SELECT IS_USED_LOCK(:name)"), {"name": name}).scalar()
        return holder is not None
    if dialect == "mssql":
        free = connection.execute(
            text("SELECT APPLOCK_TEST('public', :resource, 'Exclusive', 'Session')"),
            {"resource": LOCK_NAMESPACE},
        ).scalar()
        return free == 0
    if dialect == "sqlite":
        path = _sqlite_lock_file(connection)
        if path is None or not os.path.exists(path):
            return False
        fd = os.open(path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing the descriptor lets go of a lock taken just now
        return False
    return False
