"""SQLite (local use): a file, no server and no users; a lock file next to it; DDL made
transactional; a copy of the file as its backup."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine

from migrator.providers.base import (
    Provider,
    Release,
    no_lock_wait,
    no_schema_refresh,
    no_session_settings,
    refuse_session_settings,
    url_query,
)

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
    auth_failed=lambda error: False,
    server_engine=False,
    prepare_engine=make_ddl_transactional,
    server_engine_options={},
    schema_is_database=False,
    refresh_default_schema=no_schema_refresh,
    owner_role=False,
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
    backup_extension="sqlite3",
    quote=_quote,
)
