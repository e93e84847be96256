"""PostgreSQL: psycopg 3, a session-level advisory lock, lock_timeout and statement_timeout,
transactional DDL, pg_dump's custom format."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from django.conf import settings
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection

from migrator.providers.base import (
    LOCK_NAMESPACE,
    Provider,
    Release,
    no_engine_preparation,
    server_url,
    url_query,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

# pg_advisory_lock takes one bigint; derive it from the namespace so that it does not collide
# with advisory locks an application takes for its own purposes.
LOCK_KEY = int.from_bytes(hashlib.sha256(LOCK_NAMESPACE.encode()).digest()[:8], "big", signed=True)
# lock_not_available: lock_timeout ended a wait.
LOCK_NOT_AVAILABLE = "55P03"


def _auth_failed(error: BaseException) -> bool:
    # libpq reports a rejected login only in the message text, not as an SQLSTATE.
    message = str(error)
    return getattr(error, "sqlstate", None) in ("28P01", "28000") or any(
        phrase in message
        for phrase in ("password authentication failed", "no pg_hba.conf entry", 'role "')
    )


def _connect_args(timeout: int) -> dict:
    # application_name shows in pg_stat_activity who holds a migration lock.
    return {"connect_timeout": timeout, "application_name": "tenant-migrations"}


def _refresh_default_schema(connection: Connection) -> None:
    # The default schema follows the user's search_path: read where reflection needs it.
    dialect = connection.dialect
    dialect.default_schema_name = dialect._get_default_schema_name(connection)
    connection.rollback()


def _session_settings(dialect: Dialect) -> dict[str, str]:
    return {
        "lock_timeout": str(settings.MIGRATION_PG_LOCK_TIMEOUT),
        "statement_timeout": str(settings.MIGRATION_PG_STATEMENT_TIMEOUT),
    }


def _lock_wait(error: BaseException) -> tuple[str, str] | None:
    if getattr(error, "sqlstate", None) != LOCK_NOT_AVAILABLE:
        return None
    return "MIGRATION_PG_LOCK_TIMEOUT", str(settings.MIGRATION_PG_LOCK_TIMEOUT)


def _take_lock(
    connection: Connection, timeout: float, session_settings: Mapping[str, str]
) -> Release | None:
    # A session-level advisory lock outlives the per-revision transactions. Nobody else holds
    # it, the usual case: one statement takes it and sets the session's settings. Otherwise the
    # wait is bounded by lock_timeout rather than by polling pg_try_advisory_lock, so waiting
    # runs queue fairly.
    params = {"key": LOCK_KEY}
    assignments = ""
    for index, (name, value) in enumerate(session_settings.items()):
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
            connection.execute(text("SELECT pg_catalog.pg_advisory_lock(:key)"), {"key": LOCK_KEY})
        except sa_exc.OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            connection.rollback()
            return None
        got = True
    if not got:
        return None
    return lambda: connection.execute(
        text("SELECT pg_catalog.pg_advisory_unlock(:key)"), {"key": LOCK_KEY}
    )


def _lock_held(connection: Connection) -> bool:
    # The advisory lock's row in pg_locks, in this database.
    unsigned = LOCK_KEY & 0xFFFFFFFFFFFFFFFF
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


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


PROVIDER = Provider(
    name="postgresql",
    label="PostgreSQL",
    aliases=("postgres",),
    dialects=("postgresql",),
    drivername="postgresql+psycopg",
    file_based=False,
    default_port=5432,
    build_url=lambda info: server_url("postgresql+psycopg", info, url_query(info)),
    connect_args=_connect_args,
    auth_failed=_auth_failed,
    server_engine=True,
    prepare_engine=no_engine_preparation,
    # psycopg's hstore adapter would be registered with the OIDs of the first database the
    # engine saw; SQLAlchemy's own HSTORE conversion works the same on every database.
    server_engine_options={"use_native_hstore": False},
    schema_is_database=False,
    refresh_default_schema=_refresh_default_schema,
    owner_role=True,
    take_lock=_take_lock,
    lock_held=_lock_held,
    session_lock=True,
    session_settings=_session_settings,
    lock_wait=_lock_wait,
    waited_lock="a lock",
    find_session="in pg_stat_activity",
    transactional_ddl=True,
    partial_ddl="",
    backup_extension="dump",
    quote=_quote,
)
