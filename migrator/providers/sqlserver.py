"""SQL Server: pyodbc (Microsoft's ODBC driver or FreeTDS), ``sp_getapplock``, transactional
DDL, ``BACKUP DATABASE`` to a file on the server."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING

from django.conf import settings
from sqlalchemy import text
from sqlalchemy.engine import URL, Connection

from migrator import engines
from migrator.exceptions import BackupFailed, RestoreFailed
from migrator.providers import toolchain
from migrator.providers.base import (
    LOCK_NAMESPACE,
    BackupTool,
    Provider,
    Release,
    never,
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
    from migrator.targets import Target

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


# --- Backups: BACKUP DATABASE and RESTORE DATABASE, on the server -----------------------------


def mssql_string(value: str) -> str:
    """``value`` as a T-SQL Unicode string literal, ``'`` doubled."""
    if "\x00" in value:
        raise ValueError("A SQL Server string literal cannot hold NUL")
    return "N'" + value.replace("'", "''") + "'"


def mssql_backup_path(target_name: str, run_id: int, *, now: datetime | None = None) -> str:
    """The backup file on the SQL Server host: ``MSSQL_BACKUP_DIR/<target>-<timestamp>-run<id>
    .bak`` (flat: SQL Server does not create directories)."""
    directory = settings.MSSQL_BACKUP_DIR.rstrip("/\\")
    separator = "\\" if "\\" in directory else "/"
    return (
        f"{directory}{separator}{target_name}-{toolchain.backup_file_name(run_id, 'bak', now=now)}"
    )


def mssql_backup_statement(database: str, path: str) -> str:
    """``BACKUP DATABASE`` of ``database`` to ``path`` on the server: a copy-only backup (it
    leaves the server's own backup chain alone), overwriting the file, with page checksums."""
    return (
        f"BACKUP DATABASE {quote(database)} TO DISK = {mssql_string(path)} "
        "WITH COPY_ONLY, INIT, CHECKSUM"
    )


def mssql_restore_statements(database: str, path: str) -> list[str]:
    """The statements restoring ``database`` from ``path``, run from ``master`` in order: check
    the file, take the database to single-user (rolling back other sessions), restore over it,
    and open it again. Run the last one even when the restore fails."""
    name = quote(database)
    disk = mssql_string(path)
    return [
        f"RESTORE VERIFYONLY FROM DISK = {disk} WITH CHECKSUM",
        f"ALTER DATABASE {name} SET SINGLE_USER WITH ROLLBACK IMMEDIATE",
        f"RESTORE DATABASE {name} FROM DISK = {disk} WITH REPLACE, CHECKSUM",
        f"ALTER DATABASE {name} SET MULTI_USER",
    ]


def _restore(target: Target, path: str) -> None:
    # RESTORE cannot run from a session inside the database it replaces: connect to master.
    master = replace(target, connection=replace(target.connection, database="master"))
    verify, single_user, restore_statement, multi_user = mssql_restore_statements(
        target.connection.database, path
    )
    hint = f"Check that {path} exists on the SQL Server host and the admin user may RESTORE."
    _execute(master, [verify], error=RestoreFailed, doing="Restoring", hint=hint)
    try:
        _execute(
            master,
            [single_user, restore_statement],
            error=RestoreFailed,
            doing="Restoring",
            hint=hint,
        )
    finally:
        _execute(master, [multi_user], error=RestoreFailed, doing="Restoring", hint=hint)


def _execute(target, statements, *, error, doing, hint) -> None:
    """Run ``statements`` outside any transaction (BACKUP and RESTORE refuse one), reading every
    result set: pyodbc returns before the server finished a BACKUP otherwise."""
    with engines.connect(target) as connection:
        raw = connection.connection.dbapi_connection
        raw.autocommit = True
        cursor = raw.cursor()
        try:
            for statement in statements:
                cursor.execute(statement)
                while cursor.nextset():
                    pass
        except Exception as exc:  # noqa: BLE001 - the driver's error, mapped with its words
            raise error(
                f"{doing} {target.name} failed: {engines.error_reason(exc, target.connection)}. "
                f"{hint}"
            ) from None
        finally:
            cursor.close()


def _dump_on_server(target: Target, run_id: int) -> str:
    path = mssql_backup_path(target.name, run_id)
    _execute(
        target,
        [mssql_backup_statement(target.connection.database, path)],
        error=BackupFailed,
        doing="Backing up",
        hint="Check that the admin user may BACKUP DATABASE (db_backupoperator) and that "
        f"the SQL Server service account may write to MSSQL_BACKUP_DIR ({path}).",
    )
    return path


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
    # Login failed for a database it may not open is error 18456 too: auth_failed.
    database_missing=never,
    connect_denied=never,
    # pyodbc takes one connection string: an engine per target.
    server_engine=False,
    prepare_engine=no_engine_preparation,
    server_engine_options={},
    schema_is_database=False,
    refresh_default_schema=no_schema_refresh,
    owner_role=False,
    autocommit=None,
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
    backup=BackupTool(
        extension="bak",
        dump=None,
        dump_on_server=_dump_on_server,
        restore=_restore,
        tables_in=lambda target, path: None,
    ),
    quote=quote,
)
