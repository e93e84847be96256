"""SQL Server: pyodbc (Microsoft's ODBC driver or FreeTDS), ``sp_getapplock``, transactional
DDL, ``BACKUP DATABASE`` to a file on the server."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from django.conf import settings
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection

from migrator.providers.base import (
    LOCK_NAMESPACE,
    Provider,
    Release,
    no_engine_preparation,
    no_lock_wait,
    no_schema_refresh,
    no_session_settings,
    refuse_session_settings,
    server_url,
    url_query,
)

if TYPE_CHECKING:
    from migrator.secrets import ConnectionInfo

DEFAULT_ODBC_DRIVER = "ODBC Driver 18 for SQL Server"
# FreeTDS speaks TDS 7.4 to every SQL Server since 2012; without it FreeTDS may pick an old one.
FREETDS_TDS_VERSION = "7.4"


def _build_url(info: ConnectionInfo) -> URL:
    query = url_query(info)
    driver = info.driver or settings.MSSQL_ODBC_DRIVER or DEFAULT_ODBC_DRIVER
    query.setdefault("driver", driver)
    if "freetds" in query["driver"].lower():
        query.setdefault("TDS_Version", FREETDS_TDS_VERSION)
    return server_url("mssql+pyodbc", info, query)


def _auth_failed(error: BaseException) -> bool:
    # pyodbc puts the SQLSTATE first; 28000 is "login failed" (error 18456).
    return (bool(error.args) and error.args[0] == "28000") or "18456" in str(error)


def _take_lock(
    connection: Connection, timeout: float, session_settings: Mapping[str, str]
) -> Release | None:
    refuse_session_settings("mssql", session_settings)
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


def _lock_held(connection: Connection) -> bool:
    free = connection.execute(
        text("SELECT APPLOCK_TEST('public', :resource, 'Exclusive', 'Session')"),
        {"resource": LOCK_NAMESPACE},
    ).scalar()
    return free == 0


def quote(name: str) -> str:
    """``name`` as a bracketed T-SQL identifier: ``]`` doubled, so nothing can close it early."""
    if not name or "\x00" in name:
        raise ValueError("A SQL Server identifier must be non-empty and without NUL")
    return "[" + name.replace("]", "]]") + "]"


PROVIDER = Provider(
    name="sqlserver",
    label="SQL Server",
    aliases=("mssql",),
    dialects=("mssql",),
    drivername="mssql+pyodbc",
    file_based=False,
    default_port=1433,
    build_url=_build_url,
    # pyodbc's ``timeout`` keyword sets the ODBC login timeout (SQL_ATTR_LOGIN_TIMEOUT).
    connect_args=lambda timeout: {"timeout": timeout},
    auth_failed=_auth_failed,
    # pyodbc takes one connection string: an engine per target.
    server_engine=False,
    prepare_engine=no_engine_preparation,
    server_engine_options={},
    schema_is_database=False,
    refresh_default_schema=no_schema_refresh,
    owner_role=False,
    take_lock=_take_lock,
    lock_held=_lock_held,
    session_lock=True,
    session_settings=no_session_settings,
    lock_wait=no_lock_wait,
    catalog_digest=None,
    unique_constraints_are_indexes=False,
    scratch_setting=None,
    drop_database=None,
    app_grants=None,
    grants_asked_as_admin=False,
    grants_login_database=None,
    waited_lock="a lock",
    find_session="in sys.dm_exec_sessions",
    transactional_ddl=True,
    partial_ddl="",
    # BACKUP DATABASE writes it on the server, in MSSQL_BACKUP_DIR.
    backup_extension="bak",
    quote=quote,
)
