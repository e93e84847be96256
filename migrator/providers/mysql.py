"""MySQL and MariaDB: PyMySQL, ``GET_LOCK``, lock_wait_timeout (and MariaDB's
max_statement_time), DDL committed statement by statement, grants read from
information_schema, mysqldump's SQL (the password in an option file only this user can read)."""

from __future__ import annotations

import functools
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from sqlalchemy import bindparam, event, text
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection, Engine

from migrator.exceptions import BackupFailed, RestoreFailed
from migrator.providers import toolchain
from migrator.providers.base import (
    APP_PRIVILEGES,
    LOCK_NAMESPACE,
    BackupTool,
    Provider,
    Release,
    never,
    no_schema_refresh,
    server_url,
    url_query,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Dialect

    from migrator.secrets import ConnectionInfo
    from migrator.targets import Target
    from migrator.verify import GrantCheck

# ER_LOCK_WAIT_TIMEOUT: lock_wait_timeout ended a wait (also for metadata locks).
LOCK_WAIT_TIMEOUT = 1205
# The session variables a migration sets (their names go into the SQL).
SESSION_SETTINGS = ("lock_wait_timeout", "max_statement_time")
# Rights that let the app user change the schema: reported as excess.
DDL_PRIVILEGES = ("CREATE", "ALTER", "DROP", "INDEX")
# Why a failed revision may be partly applied: every message that says so starts from this.
PARTIAL_DDL = "MySQL and MariaDB commit each DDL statement at once"


# --- Reaching it, its migration lock ----------------------------------------------------------


def _auth_failed(error: BaseException) -> bool:
    # 1044: access denied to the database, 1045: access denied (password), 1698: plugin auth.
    return bool(error.args) and error.args[0] in (1044, 1045, 1698)


def _database_missing(error: BaseException) -> bool:
    # ER_BAD_DB_ERROR.
    return bool(getattr(error, "args", None)) and error.args[0] == 1049


# PyMySQL (from 1.2) tries TLS on every connection whose URL asks nothing of it ("preferred":
# TLS when the server offers it, no certificate checked) and builds a new TLS context for each:
# ssl.create_default_context() loads the system's CA bundle, about 20 ms of CPU per connection
# here, most of what a run that finds nothing to do costs, for a context that checks no
# certificate. That context is the same for every connection, so it is built once per process
# and shared (an SSLContext is made to be shared; nothing changes it once built). TLS options
# from the URL (ssl_ca, ssl_cert...) still get a context of their own, as PyMySQL builds it.
_preferred_tls: list = []  # [the context], once built


@functools.cache
def _connection_class():
    import pymysql.connections  # here: a control plane without MySQL targets never needs it

    class SharedTlsConnection(pymysql.connections.Connection):
        def _create_ssl_ctx(self, sslp):
            if sslp != {}:  # TLS options from the URL: as PyMySQL builds them
                return super()._create_ssl_ctx(sslp)
            if not _preferred_tls:
                _preferred_tls.append(super()._create_ssl_ctx(sslp))
            return _preferred_tls[0]

    return SharedTlsConnection


def _shared_tls_connect(dialect, connection_record, cargs, cparams):
    # Registered after the server engine's own do_connect listener, which completes the
    # arguments with the target's login: this one opens the connection with them.
    return _connection_class()(*cargs, **cparams)


def _prepare_engine(engine: Engine) -> None:
    event.listen(engine, "do_connect", _shared_tls_connect)


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


# GET_LOCK names are server-wide, not per database: the name carries the database,
# "tenant_migrations:<database>", or when that is longer than MySQL allows (64 characters)
# "tenant_migrations:" and the first 40 hex digits of the database name's sha256. The server
# makes it from DATABASE() in the statement that uses it (no round trip to ask for the name
# first); the name is the same whoever asks, a control plane of any version or the `alembic`
# CLI.
_LOCK_NAME = (
    "(SELECT IF(CHAR_LENGTH(CONCAT(:namespace, ':', d.name)) > 64, "
    "CONCAT(:namespace, ':', LEFT(SHA2(d.name, 256), 40)), CONCAT(:namespace, ':', d.name)) "
    "FROM (SELECT COALESCE(DATABASE(), '') AS name) d)"
)
_GET_LOCK = f"SELECT GET_LOCK(l.name, :timeout), l.name FROM (SELECT {_LOCK_NAME} AS name) l"  # noqa: S608
_IS_USED_LOCK = f"SELECT IS_USED_LOCK({_LOCK_NAME})"


def _take_lock(
    connection: Connection, timeout: float, session_settings: Mapping[str, str]
) -> Release | None:
    unknown = set(session_settings) - set(SESSION_SETTINGS)
    if unknown:
        raise ValueError(f"unknown MySQL session settings: {', '.join(sorted(unknown))}")
    got, lock_name = connection.execute(
        text(_GET_LOCK),
        {"namespace": LOCK_NAMESPACE, "timeout": max(0, math.ceil(timeout))},
    ).one()
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
    return lambda: connection.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": lock_name})


def _lock_held(connection: Connection) -> bool:
    return (
        connection.execute(text(_IS_USED_LOCK), {"namespace": LOCK_NAMESPACE}).scalar() is not None
    )


def _quote(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


# --- The app user's grants (verify) -----------------------------------------------------------


# The app user's privileges (and its enabled roles'), in three scopes: global, on the database,
# on its tables.
_PRIVILEGES = (
    "SELECT 'global', NULL, PRIVILEGE_TYPE FROM information_schema.USER_PRIVILEGES "
    "WHERE GRANTEE IN :grantees "
    "UNION ALL "
    "SELECT 'database', NULL, PRIVILEGE_TYPE FROM information_schema.SCHEMA_PRIVILEGES "
    "WHERE GRANTEE IN :grantees AND :database LIKE TABLE_SCHEMA "
    "UNION ALL "
    "SELECT 'table', TABLE_NAME, PRIVILEGE_TYPE FROM information_schema.TABLE_PRIVILEGES "
    "WHERE GRANTEE IN :grantees AND TABLE_SCHEMA = :database"
)


def _app_grants(
    connection: Connection,
    check: GrantCheck,
    tables: list[str],
    *,
    namespace: str | None,
    database: str | None,
    role: str | None = None,
) -> bool:
    """The current (app) user's rows of information_schema.USER_PRIVILEGES (global),
    SCHEMA_PRIVILEGES (the database; grants may use wildcards) and TABLE_PRIVILEGES, with those
    of its enabled roles. SHOW GRANTS would say the same, but as text to parse. MySQL tells a
    user only its own grants: ``role`` must be None (logged in as the app user). True."""
    user = connection.execute(text("SELECT CURRENT_USER()")).scalar()
    name, _, host = user.rpartition("@")
    grantees = [f"'{name}'@'{host}'"]
    try:
        roles = connection.execute(
            text("SELECT ROLE_NAME FROM information_schema.ENABLED_ROLES")
        ).scalars()
        grantees += [f"'{role}'" for role in roles]
    except sa_exc.DBAPIError:
        connection.rollback()  # a server without roles
    # The three scopes in one statement, one round trip. A database-level grant may name its
    # database with wildcards (`t\_my\_%`.*).
    statement = text(_PRIVILEGES).bindparams(bindparam("grantees", expanding=True))
    global_: set = set()
    on_database: set = set()
    on_table: dict[str, set] = {}
    for scope, table, privilege in connection.execute(
        statement, {"grantees": grantees, "database": database}
    ):
        if scope == "table":
            on_table.setdefault(table, set()).add(privilege)
        else:
            (global_ if scope == "global" else on_database).add(privilege)

    for table in tables:
        granted = global_ | on_database | on_table.get(table, set())
        lacking = [p for p in APP_PRIVILEGES if p not in granted]
        if lacking:
            check.missing[table] = lacking
    scopes = (("*.* (every database)", global_), (f"database {database}", on_database))
    for scope, granted in scopes:
        ddl = [p for p in DDL_PRIVILEGES if p in granted]
        if ddl:
            check.excess.append(f"{', '.join(ddl)} on {scope}")
    for table in sorted(on_table):
        ddl = [p for p in DDL_PRIVILEGES if p in on_table[table]]
        if ddl:
            check.excess.append(f"{', '.join(ddl)} on table {table}")
    return True


# --- Backups: mysqldump and mysql -------------------------------------------------------------


def mysql_option_file_text(info: ConnectionInfo) -> str:
    """The ``[client]`` option file holding the admin password for mysqldump and mysql."""
    password = info.password.reveal() if info.password is not None else ""
    escaped = (
        password.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'[client]\npassword="{escaped}"\n'


def mysqldump_command(
    info: ConnectionInfo, option_file: str, binary: str = "mysqldump"
) -> list[str]:
    """The argv of ``mysqldump`` for ``info``; the password is read from ``option_file``.

    ``--single-transaction`` takes a consistent snapshot without locking InnoDB tables;
    ``--no-tablespaces`` because dumping tablespaces needs the PROCESS privilege (MySQL 8).
    """
    return [
        binary,
        f"--defaults-extra-file={option_file}",  # must come first
        "--protocol=TCP",
        f"--host={info.host}",
        f"--port={info.port}",
        f"--user={info.username}",
        "--single-transaction",
        "--routines",
        "--triggers",
        "--hex-blob",
        "--no-tablespaces",
        "--default-character-set=utf8mb4",
        info.database,
    ]


def mysql_restore_command(
    info: ConnectionInfo, option_file: str, binary: str = "mysql"
) -> list[str]:
    """The argv of ``mysql`` reading a dump on stdin into ``info``'s database."""
    return [
        binary,
        f"--defaults-extra-file={option_file}",
        "--protocol=TCP",
        f"--host={info.host}",
        f"--port={info.port}",
        f"--user={info.username}",
        f"--connect-timeout={settings.DATABASE_CONNECT_TIMEOUT}",
        "--default-character-set=utf8mb4",
        "--batch",
        "--binary-mode",
        info.database,
    ]


@contextmanager
def mysql_option_file(info: ConnectionInfo) -> Iterator[str]:
    """An option file with the admin password in a fresh private directory (0700, file 0600),
    deleted when the block ends."""
    directory = tempfile.mkdtemp(prefix="tenant-migrations-")
    try:
        path = Path(directory) / "client.cnf"
        with toolchain.new_file(path) as file:
            file.write(mysql_option_file_text(info).encode())
        yield str(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _tool_environment() -> dict[str, str]:
    # The option file is the one source of the password: an inherited MYSQL_PWD must not win.
    return {key: value for key, value in os.environ.items() if key != "MYSQL_PWD"}


def _dump(target: Target, out: Path) -> None:
    info = target.connection
    binary = toolchain.find_tool(
        target, BackupFailed, "mysqldump", "mariadb-dump", package="mariadb-client"
    )
    with mysql_option_file(info) as option_file, toolchain.new_file(out) as file:
        toolchain.run_tool(
            target,
            "mysqldump",
            mysqldump_command(info, option_file, binary),
            env=_tool_environment(),
            stdout=file,
            error=BackupFailed,
            doing="Backing up",
            hint="Check that the admin user has SELECT, SHOW VIEW, TRIGGER, LOCK TABLES and "
            "EXECUTE on the database, that the DEFINER of every view and routine exists, and "
            "that BACKUP_DIR has free space.",
        )
    toolchain.not_empty(target, "mysqldump", out)


def _restore(target: Target, path: str) -> None:
    info = target.connection
    binary = toolchain.find_tool(
        target, RestoreFailed, "mysql", "mariadb", package="mariadb-client"
    )
    with mysql_option_file(info) as option_file, open(path, "rb") as dump:
        toolchain.run_tool(
            target,
            "mysql",
            mysql_restore_command(info, option_file, binary),
            env=_tool_environment(),
            stdin=dump,
            error=RestoreFailed,
            doing="Restoring",
            hint="MySQL and MariaDB commit each statement at once: the tables before the one "
            "that failed were restored. Fix the cause and restore again.",
        )


def _tables_in(target: Target, path: str) -> set[str]:
    names = set()
    with open(path, encoding="utf-8", errors="replace") as dump:
        for line in dump:
            match = re.match(r"CREATE TABLE `((?:[^`]|``)+)`", line)
            if match:
                names.add(match[1].replace("``", "`"))
    return names


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
    database_missing=_database_missing,
    # Access to a database is a grant: refused at login as 1044, which auth_failed covers.
    connect_denied=never,
    server_engine=True,
    prepare_engine=_prepare_engine,
    server_engine_options={},
    schema_is_database=True,
    refresh_default_schema=no_schema_refresh,
    owner_role=False,
    # PyMySQL sends SET AUTOCOMMIT to switch: a round trip each way, what it would save.
    autocommit=None,
    take_lock=_take_lock,
    lock_held=_lock_held,
    session_lock=True,
    session_settings=_session_settings,
    lock_wait=_lock_wait,
    catalog_digest=None,
    # A unique constraint is a unique index: the inspector lists it with the indexes.
    unique_constraints_are_indexes=True,
    scratch_setting="VERIFY_SCRATCH_MYSQL_URL",
    drop_database=lambda name: f"DROP DATABASE IF EXISTS {_quote(name)}",
    app_grants=_app_grants,
    grants_asked_as_admin=False,
    # Every user may open information_schema, even one with no grant on its database.
    grants_login_database="information_schema",
    waited_lock="a metadata lock",
    find_session="with SHOW PROCESSLIST",
    transactional_ddl=False,
    partial_ddl=PARTIAL_DDL,
    backup=BackupTool(
        extension="sql",
        dump=_dump,
        dump_on_server=None,
        restore=_restore,
        tables_in=_tables_in,
    ),
    quote=_quote,
)
