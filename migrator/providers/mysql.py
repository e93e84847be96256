"""MySQL and MariaDB: PyMySQL, ``GET_LOCK``, lock_wait_timeout (and MariaDB's
max_statement_time), DDL committed statement by statement, mysqldump's SQL."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from django.conf import settings
from sqlalchemy import text
from sqlalchemy.engine import Connection

from migrator.providers.base import (
    LOCK_NAMESPACE,
    Provider,
    Release,
    no_engine_preparation,
    no_schema_refresh,
    server_url,
    url_query,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

_MAX_LOCK_NAME = 64
# ER_LOCK_WAIT_TIMEOUT: lock_wait_timeout ended a wait (also for metadata locks).
LOCK_WAIT_TIMEOUT = 1205
# The session variables a migration sets (their names go into the SQL).
SESSION_SETTINGS = ("lock_wait_timeout", "max_statement_time")
# Why a failed revision may be partly applied: every message that says so starts from this.
PARTIAL_DDL = "MySQL and MariaDB commit each DDL statement at once"


def _auth_failed(error: BaseException) -> bool:
    # 1044: access denied to the database, 1045: access denied (password), 1698: plugin auth.
    return bool(error.args) and error.args[0] in (1044, 1045, 1698)


def _session_settings(dialect: Dialect) -> dict[str, str]:
    # lock_wait_timeout (seconds) bounds the wait for a metadata lock, which an open application
    # transaction that read the table holds. MySQL's max_execution_time bounds SELECTs only,
    # not DDL, so only MariaDB gets a statement bound.
    values = {"lock_wait_timeout": str(settings.MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT)}
    if getattr(dialect, "is_mariadb", False) and settings.MIGRATION_MYSQL_STATEMENT_TIMEOUT:
        values["max_statement_time"] = str(settings.MIGRATION_MYSQL_STATEMENT_TIMEOUT)
    return values


def _lock_wait(error: BaseException) -> tuple[str, str] | None:
    if not (getattr(error, "args", None) and error.args[0] == LOCK_WAIT_TIMEOUT):
        return None
    return "MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT", f"{settings.MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT} s"


def _lock_name(connection: Connection) -> str:
    # GET_LOCK names are server-wide, not per database: the name carries the database.
    database = connection.execute(text("SELECT DATABASE()")).scalar() or ""
    name = f"{LOCK_NAMESPACE}:{database}"
    if len(name) > _MAX_LOCK_NAME:
        name = f"{LOCK_NAMESPACE}:{hashlib.sha256(database.encode()).hexdigest()[:40]}"
    return name


def _take_lock(
    connection: Connection, timeout: float, session_settings: Mapping[str, str]
) -> Release | None:
    unknown = set(session_settings) - set(SESSION_SETTINGS)
    if unknown:
        raise ValueError(f"unknown MySQL session settings: {', '.join(sorted(unknown))}")
    name = _lock_name(connection)
    got = connection.execute(
        text("SELECT GET_LOCK(:name, :timeout)"),
        {"name": name, "timeout": max(0, math.ceil(timeout))},
    ).scalar()
    if got != 1:
        return None
    if session_settings:
        # Once the lock is held: the wait for it is bounded by its own timeout, not by
        # max_statement_time. Numbers, not strings: MySQL refuses a quoted numeric value.
        connection.execute(
            text("SET " + ", ".join(f"SESSION {name} = :{name}" for name in session_settings)),
            {
                name: float(value) if "." in str(value) else int(value)
                for name, value in session_settings.items()
            },
        )
    return lambda: connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})


def _lock_held(connection: Connection) -> bool:
    name = _lock_name(connection)
    return (
        connection.execute(text("SELECT IS_USED_LOCK(:name)"), {"name": name}).scalar() is not None
    )


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


PROVIDER = Provider(
    name="mysql",
    label="MySQL / MariaDB",
    aliases=("mariadb",),
    # SQLAlchemy names the dialect of a mariadb:// URL "mariadb".
    dialects=("mysql", "mariadb"),
    drivername="mysql+pymysql",
    file_based=False,
    default_port=3306,
    build_url=lambda info: server_url("mysql+pymysql", info, url_query(info)),
    connect_args=lambda timeout: {"connect_timeout": timeout},
    auth_failed=_auth_failed,
    server_engine=True,
    prepare_engine=no_engine_preparation,
    server_engine_options={},
    schema_is_database=True,
    refresh_default_schema=no_schema_refresh,
    owner_role=False,
    take_lock=_take_lock,
    lock_held=_lock_held,
    session_lock=True,
    session_settings=_session_settings,
    lock_wait=_lock_wait,
    waited_lock="a metadata lock",
    find_session="with SHOW PROCESSLIST",
    transactional_ddl=False,
    partial_ddl=PARTIAL_DDL,
    backup_extension="sql",
    quote=_quote,
)
