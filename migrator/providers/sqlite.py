"""SQLite (local use): a file, no server and no users; a lock file next to it; DDL made
transactional; a consistent copy of the file (SQLite's online backup API) as its backup."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine

from migrator.exceptions import BackupFailed, MigratorError, RestoreFailed
from migrator.providers import toolchain
from migrator.providers.base import (
    BackupTool,
    Provider,
    Release,
    never,
    no_lock_wait,
    no_schema_refresh,
    no_session_settings,
    refuse_session_settings,
    url_query,
)

if TYPE_CHECKING:
    from migrator.targets import Target

try:
    import fcntl
except ImportError:  # Windows: a migration author's own machine, nothing to guard against.
    fcntl = None

_POLL_SECONDS = 0.1


def make_ddl_transactional(engine: Engine) -> None:
    """Let SQLite DDL take part in transactions, so that a failing revision rolls back whole.

    Python's sqlite3 module (before 3.12's ``autocommit``) opens transactions only before
    INSERT/UPDATE/DELETE and so commits a CREATE TABLE at once. This is SQLAlchemy's documented
    recipe: turn the module's own handling off and emit BEGIN ourselves.
    """

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection, connection_record):
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql("BEGIN")


def _lock_file(connection: Connection) -> str | None:
    database = connection.engine.url.database
    if fcntl is None or not database or database == ":memory:" or "mode=memory" in database:
        return None
    return f"{os.path.abspath(database)}.migration-lock"


def _take_lock(
    connection: Connection, timeout: float, session_settings: Mapping[str, str]
) -> Release | None:
    refuse_session_settings("sqlite", session_settings)
    # Not BEGIN EXCLUSIVE: with one transaction per revision that lock would end at the first
    # revision's COMMIT, and another run could start between two revisions. A lock file is held
    # for the whole run; SQLite databases are local files, so every process that can open the
    # database can see the lock. In-memory databases are private to their connection.
    path = _lock_file(connection)
    if path is None:
        return lambda: None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                return None
            time.sleep(_POLL_SECONDS)
        else:
            return lambda: os.close(fd)  # closing the descriptor releases the lock


def _lock_held(connection: Connection) -> bool:
    # A non-blocking flock on the lock file, let go at once.
    path = _lock_file(connection)
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


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


# --- Backups: SQLite's online backup API ------------------------------------------------------


def _uri(path: str, mode: str) -> str:
    return f"{Path(path).resolve().as_uri()}?mode={mode}"


def _database_file(target: Target, error: type[MigratorError]) -> str:
    database = target.connection.database
    if database == ":memory:" or "mode=memory" in database:
        raise error(f"{target.name} is an in-memory SQLite database: there is no file to copy.")
    return database


def _dump(target: Target, out: Path) -> None:
    source = _database_file(target, BackupFailed)
    with toolchain.new_file(out):
        pass  # created 0600; SQLite writes into it
    if not Path(source).exists():
        return  # nothing yet: the empty file is an empty database, which is what restores
    try:
        with (
            closing(sqlite3.connect(_uri(source, "ro"), uri=True, timeout=_busy())) as src,
            closing(sqlite3.connect(out)) as dest,
        ):
            src.backup(dest)
    except sqlite3.Error as exc:
        raise BackupFailed(
            f"Backing up {target.name} failed: SQLite could not copy {source} ({exc}). Check "
            "that the file is a SQLite database this process may read."
        ) from None


def _restore(target: Target, path: str) -> None:
    database = _database_file(target, RestoreFailed)
    try:
        with (
            closing(sqlite3.connect(_uri(path, "ro"), uri=True)) as src,
            closing(sqlite3.connect(database, timeout=_busy())) as dest,
        ):
            src.backup(dest)
    except sqlite3.Error as exc:
        raise RestoreFailed(
            f"Restoring {target.name} failed: SQLite could not copy {path} into {database} ({exc})."
        ) from None


def _busy() -> float:
    return float(settings.DATABASE_CONNECT_TIMEOUT)


def _tables_in(target: Target, path: str) -> None:
    return None  # the copy replaced the whole file


PROVIDER = Provider(
    name="sqlite",
    label="SQLite (local use)",
    aliases=(),
    dialects=("sqlite",),
    drivername="sqlite+pysqlite",
    file_based=True,
    default_port=None,
    build_url=lambda info: URL.create(
        "sqlite+pysqlite", database=info.database, query=url_query(info)
    ),
    # For SQLite the only wait is for another writer's lock on the file.
    connect_args=lambda timeout: {"timeout": timeout},
    auth_failed=never,
    database_missing=never,  # a missing file is created
    connect_denied=never,
    server_engine=False,
    prepare_engine=make_ddl_transactional,
    server_engine_options={},
    schema_is_database=False,
    refresh_default_schema=no_schema_refresh,
    owner_role=False,
    autocommit=None,
    take_lock=_take_lock,
    lock_held=_lock_held,
    # A lock file: released at the block's end, never left to the session.
    session_lock=False,
    session_settings=no_session_settings,
    lock_wait=no_lock_wait,
    catalog_digest=None,
    unique_constraints_are_indexes=False,
    scratch_setting=None,  # a file in a temporary directory
    drop_database=None,
    app_grants=None,
    grants_asked_as_admin=False,
    grants_login_database=None,
    waited_lock="a lock",
    find_session="with lsof on the database file",
    transactional_ddl=True,
    partial_ddl="",
    backup=BackupTool(
        extension="sqlite3",
        dump=_dump,
        dump_on_server=None,
        restore=_restore,
        tables_in=_tables_in,
    ),
    quote=_quote,
)
