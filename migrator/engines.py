"""SQLAlchemy engines for target databases, one provider at a time.

``build_url`` turns a ``ConnectionInfo`` (from ``migrator.secrets``) into a SQLAlchemy URL with
``URL.create``, so user names and passwords with ``@``, ``:``, ``/`` or ``%`` need no quoting.
``connect`` opens the one connection a migration run uses and maps the driver's connect errors
to ``DatabaseUnreachable`` or ``DatabaseAuthFailed``, whose messages never contain the password.

PostgreSQL and MySQL connections come from one engine per database server (and per thread),
not one per target: each target's database, user and password are handed to the driver when
its connection opens (SQLAlchemy's ``do_connect`` event). A new engine costs a round of
"what server is this" queries on its first connection and starts with an empty statement
cache, and SQLAlchemy's class-level caches (PostgreSQL's reflection queries) keep up to 128 of
those dialects alive: an engine per run cost about 3 ms of CPU per run and made a worker grow
by 80% over 1,000 migrations (bench/README.md). What SQLAlchemy learns per database rather than
per server, the default schema, is set on each connection: MySQL's is the connection's database;
PostgreSQL's is read where reflection needs it (``refresh_default_schema``).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.conf import settings
from sqlalchemy import create_engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.pool import NullPool

from migrator import process, providers
from migrator.exceptions import (
    DatabaseAuthFailed,
    DatabaseNotFound,
    DatabaseUnreachable,
    OwnerRoleFailed,
)
from migrator.redaction import redact

if TYPE_CHECKING:
    from migrator.secrets import ConnectionInfo
    from migrator.targets import Target

# Engines kept per thread; more servers than this (one per dedicated tenant) just cost a new
# engine for the least recently used one.
SERVER_ENGINES_KEPT = 8
# Statements compiled once per engine and reused. What repeats from run to run (text()
# statements, the version table's INSERT and UPDATE, the inspector's queries) is a few dozen
# entries; a larger cache (500 by default: 10 MB) would only keep what never repeats.
SERVER_ENGINE_STATEMENT_CACHE = 64


def build_url(info: ConnectionInfo) -> URL:
    """The SQLAlchemy URL for ``info`` in its provider's form (``providers``); ``info.options``
    become query parameters (``sslmode``). Raises ``UnknownProvider`` naming the known ones.

    Render it only with ``url.render_as_string(hide_password=True)``.
    """
    return providers.get(info.provider).build_url(info)


def build_engine(info: ConnectionInfo) -> Engine:
    """An engine for ``info`` without a pool (each run opens one connection and closes it),
    with the driver's connect timeout set to ``DATABASE_CONNECT_TIMEOUT`` seconds."""
    provider = providers.get(info.provider)
    engine = create_engine(
        build_url(info),
        poolclass=NullPool,
        connect_args=provider.connect_args(settings.DATABASE_CONNECT_TIMEOUT),
    )
    provider.prepare_engine(engine)
    return engine


def session_settings(connection: Connection) -> dict[str, str]:
    """Session settings for a migration run, set with the target lock (``locks.target_lock``),
    so that a revision waiting on a lock held by live traffic gives up instead of queueing every
    application query on that table behind it.

    PostgreSQL: ``lock_timeout`` and ``statement_timeout`` from MIGRATION_PG_LOCK_TIMEOUT and
    MIGRATION_PG_STATEMENT_TIMEOUT. MySQL/MariaDB: ``lock_wait_timeout`` (seconds: the wait for a
    metadata lock, which an open application transaction that read the table holds) from
    MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT and, on MariaDB only, ``max_statement_time`` from
    MIGRATION_MYSQL_STATEMENT_TIMEOUT (MySQL's ``max_execution_time`` bounds SELECTs only, not
    DDL, so MySQL gets no statement bound). Session-level, not per transaction: they must
    outlive each revision's own transaction. Nothing for the other servers.
    """
    provider = providers.for_dialect(connection.dialect.name)
    return provider.session_settings(connection.dialect) if provider is not None else {}


@contextmanager
def connect(target: Target) -> Iterator[Connection]:
    """Open the connection to ``target``'s database as its admin user; closed on exit.

    Raises ``DatabaseAuthFailed`` when the database rejects the credentials and
    ``DatabaseUnreachable`` when it cannot be reached within ``DATABASE_CONNECT_TIMEOUT``.

    On PostgreSQL, when the secret names an ``owner_role``, the session switches to it
    (``SET ROLE``, committed: it lasts for the session, through every revision's transaction)
    before anything else runs on it, so that what the migration creates is owned by that role
    and not by the user that logged in (which Vault may drop after the run). Raises
    ``OwnerRoleFailed`` when the user may not.
    """
    with _open(target.connection, lambda exc: connect_error(target, exc)) as connection:
        if target.connection.owner_role and providers.get(target.connection.provider).owner_role:
            _set_owner_role(target, connection)
        yield connection


def _set_owner_role(target: Target, connection: Connection) -> None:
    info = target.connection
    role = info.owner_role
    try:
        with providers.autocommit(connection):  # one round trip, not three
            connection.exec_driver_sql(
                f"SET ROLE {connection.dialect.identifier_preparer.quote(role)}"
            )
            connection.commit()
    except sa_exc.DBAPIError as exc:
        reason = error_reason(exc, info)
        source = info.credentials_path or info.vault_path
        if "/creds/" in info.credentials_path:  # a user Vault made: its grant is in the role
            grant = (
                f'in the Vault role\'s creation_statements add GRANT "{role}" TO "{{{{name}}}}";'
            )
        else:  # a standing user (the KV pair, a static role's): grant it once
            grant = f'GRANT "{role}" TO "{info.username}";'
        raise OwnerRoleFailed(
            f"Nothing ran on {target.name}: user {info.username!r} (from {source}) could not "
            f"switch to the owner role {role!r} named by owner_role in the secret at "
            f"{info.vault_path} (SET ROLE: {reason}). Grant it: {grant} Or correct owner_role "
            "in the secret."
        ) from None


@contextmanager
def connect_as(info: ConnectionInfo) -> Iterator[Connection]:
    """Open a connection with ``info`` (any user: the app user's grant check logs in with it)
    on the same engines as ``connect``; a failed connect raises the driver's ``DBAPIError``."""
    with _open(info, None) as connection:
        yield connection


@contextmanager
def _open(info: ConnectionInfo, map_error) -> Iterator[Connection]:
    def failed(exc):
        return map_error(exc) if map_error is not None else exc

    provider = providers.get(info.provider)
    if not provider.server_engine:
        engine = build_engine(info)
        try:
            try:
                connection = engine.connect()
            except sa_exc.DBAPIError as exc:
                raise failed(exc) from None
            with connection:
                yield connection
        finally:
            engine.dispose()
        return
    engine = server_engine(info)
    _, login = engine.dialect.create_connect_args(build_url(info))
    token = _login.set(login)
    try:
        connection = engine.connect()
    except sa_exc.DBAPIError as exc:
        raise failed(exc) from None
    finally:
        _login.reset(token)
    with connection:
        if provider.schema_is_database:
            # The dialect's default schema is the database (its has_table, which Alembic asks
            # about alembic_version, looks there): this connection's, known without a query.
            engine.dialect.default_schema_name = info.database
        yield connection


def refresh_default_schema(connection: Connection) -> None:
    """Read the default schema of ``connection`` into its dialect before reflecting on it.

    A server engine's dialect serves many databases and users; PostgreSQL's default schema
    follows the user's ``search_path``, so it is read (one query) where reflection needs it,
    not on every connect.
    """
    provider = providers.for_dialect(connection.dialect.name)
    if provider is not None:
        provider.refresh_default_schema(connection)


# The connect arguments (database, user, password) of the connection being opened.
_login: ContextVar[dict | None] = ContextVar("login", default=None)
_server_engines = threading.local()


def server_engine(info: ConnectionInfo) -> Engine:
    """The engine of this thread for the database server of ``info`` (PostgreSQL or MySQL),
    made on first use; it opens connections only inside ``connect``, as the target's user."""
    provider = providers.get(info.provider)
    timeout = settings.DATABASE_CONNECT_TIMEOUT
    key = (
        provider.name,
        info.host,
        info.port,
        tuple(sorted((str(k), str(v)) for k, v in info.options.items())),
        timeout,
    )
    engines = getattr(_server_engines, "engines", None)
    if engines is None:
        engines = _server_engines.engines = OrderedDict()
    engine = engines.get(key)
    if engine is not None:
        engines.move_to_end(key)
        return engine
    query = {str(k): str(v) for k, v in info.options.items()}
    engine = create_engine(
        URL.create(provider.drivername, host=info.host, port=info.port, query=query),
        poolclass=NullPool,
        # The pool's reset before it closes a connection: a ROLLBACK round trip (PyMySQL sends
        # one whatever the connection did) for what the server does itself on disconnect.
        pool_reset_on_return=None,
        connect_args=provider.connect_args(timeout),
        query_cache_size=SERVER_ENGINE_STATEMENT_CACHE,
        **provider.server_engine_options,
    )
    event.listen(engine, "do_connect", _connect_as_target)
    provider.prepare_engine(engine)  # after: its own do_connect listeners see the login
    engines[key] = engine
    while len(engines) > SERVER_ENGINES_KEPT:
        engines.popitem(last=False)
    return engine


def _connect_as_target(dialect, connection_record, cargs, cparams):
    login = _login.get()
    if login is None:
        raise RuntimeError("A server engine opens connections only in migrator.engines.connect")
    cparams.update(login)


def _forget_server_engines() -> None:
    # Every thread's: after a settings change (tests), and in a forked child, whose engines
    # must be its own.
    global _server_engines
    _server_engines = threading.local()


process.register(
    "engines.server_engines", reset=_forget_server_engines, after_fork=_forget_server_engines
)


def connect_error(
    target: Target, error: sa_exc.DBAPIError
) -> DatabaseAuthFailed | DatabaseNotFound | DatabaseUnreachable:
    """The engine's exception for a failed connect to ``target``, with what to check."""
    info = target.connection
    provider = providers.get(info.provider)
    reason = error_reason(error, info)
    if provider.file_based:
        return DatabaseUnreachable(
            f"Cannot open the SQLite database of {target.name} at {info.database} ({reason}): "
            f"check the 'database' path in the Vault secret at {info.vault_path} and that the "
            "control plane may read and write that file and its directory."
        )
    where = f"{info.host}:{info.port}" if info.port else f"{info.host}"
    if provider.database_missing(error.orig):
        return DatabaseNotFound(
            f"The database {info.database!r} of {target.name} does not exist on {where} "
            f"({reason}). Create it, or correct 'database' in the Vault secret at "
            f"{info.vault_path}; then run the migration again."
        )
    if provider.auth_failed(error.orig):
        return DatabaseAuthFailed(
            f"The database of {target.name} at {where} rejected user {info.username!r} "
            f"({reason}). Check the admin credentials in the Vault secret at "
            f"{info.credentials_path or info.vault_path}: "
            f"the password may have been rotated, or the user may not be allowed to connect to "
            f"database {info.database!r}."
        )
    return DatabaseUnreachable(
        f"Cannot connect to the database of {target.name} at {where} ({reason}), gave up after "
        f"at most {settings.DATABASE_CONNECT_TIMEOUT}s (DATABASE_CONNECT_TIMEOUT). Check that the "
        f"host, port and database in the Vault secret at {info.vault_path} are right, that the "
        "server is running, and that the control plane can reach it (DNS, firewall)."
    )


@dataclass(frozen=True)
class LockWait:
    """A statement that gave up waiting for a lock another session held."""

    setting: str  # the setting that bounds the wait
    waited: str  # how long, as the setting says it ("5 s", "5s")
    table: str | None  # the table the statement was about, when it can be told


# The table a DDL or DML statement is about: what it waited to lock.
_STATEMENT_TABLE = re.compile(
    r"^\s*(?:ALTER\s+TABLE(?:\s+ONLY)?(?:\s+IF\s+EXISTS)?|DROP\s+TABLE(?:\s+IF\s+EXISTS)?"
    r"|TRUNCATE(?:\s+TABLE)?|RENAME\s+TABLE|LOCK\s+TABLES?|INSERT\s+INTO|UPDATE|DELETE\s+FROM"
    r"|CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?\S+\s+ON"
    r"|DROP\s+INDEX\s+\S+\s+ON)\s+([`\"\w.$]+)",
    re.IGNORECASE,
)


def lock_wait(error: BaseException) -> LockWait | None:
    """What lock wait ``error`` ended, when it is a lock timeout of the migration session
    (PostgreSQL's ``lock_timeout``, MySQL's ``lock_wait_timeout``); None for any other error."""
    if not isinstance(error, sa_exc.DBAPIError):
        return None
    for provider in providers.registered():
        waited = provider.lock_wait(error.orig)
        if waited is not None:
            break
    else:
        return None
    match = _STATEMENT_TABLE.match(error.statement or "")
    table = match.group(1).replace("`", "").replace('"', "") if match else None
    return LockWait(*waited, table)


def error_reason(error: BaseException, info: ConnectionInfo | None = None) -> str:
    """The driver's own words for ``error`` on one short line, without any secret value.

    For an error that did not come from the driver, the exception's type and message. What
    follows the first line (PostgreSQL's DETAIL and HINT, the rest of a revision's own
    message) is ``error_details``.
    """
    lines = _error_lines(error, info)
    text = lines[0] if lines else type(error).__name__
    # libpq prefixes the part that matters with the server address it already reported.
    text = re.sub(r"^connection failed: ", "", text)
    return text[:500]


# The most of an error's further lines a run keeps (its whole error is bounded again on record).
ERROR_DETAILS_LIMIT = 6000


def error_details(error: BaseException, info: ConnectionInfo | None = None) -> str:
    """The lines of ``error`` after its first (``error_reason``), without any secret value:
    PostgreSQL's ``DETAIL: Key (name)=(site_name) is duplicated.`` and ``HINT:``, the rows a
    revision's own message lists. Empty when there are none; bounded in size."""
    lines = _error_lines(error, info)[1:]
    text = "\n".join(re.sub(r"^(DETAIL|HINT|CONTEXT|WHERE):\s+", r"\1: ", line) for line in lines)
    if len(text) > ERROR_DETAILS_LIMIT:
        text = (
            text[:ERROR_DETAILS_LIMIT] + f" … ({len(text) - ERROR_DETAILS_LIMIT} more characters)"
        )
    return text


def _error_lines(error: BaseException, info: ConnectionInfo | None) -> list[str]:
    """The non-empty lines of the driver's (or the exception's) message, redacted."""
    if isinstance(error, sa_exc.DBAPIError):
        args = error.orig.args
        if len(args) >= 2 and isinstance(args[0], int) and isinstance(args[1], str):
            text = f"{args[1]} ({args[0]})"  # PyMySQL: (code, message)
        elif len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
            text = f"{args[1]} (SQLSTATE {args[0]})"  # pyodbc: (sqlstate, message)
        else:
            text = str(error.orig)
    else:
        text = f"{type(error).__name__}: {error}"
    if info is not None and info.password is not None and info.password.reveal():
        text = text.replace(info.password.reveal(), "**redacted**")
    return [line.strip() for line in redact(text).splitlines() if line.strip()]
