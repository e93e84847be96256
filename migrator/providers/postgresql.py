"""PostgreSQL: psycopg 3, a session-level advisory lock, lock_timeout and statement_timeout,
transactional DDL, a catalog digest and a grants query in one statement each, pg_dump's custom
format (the password in ``PGPASSWORD``, never on a command line)."""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

from django.conf import settings
from psycopg.pq import TransactionStatus
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.engine import Connection

from migrator import engines
from migrator.exceptions import BackupFailed, RestoreFailed
from migrator.providers import toolchain
from migrator.providers.base import (
    APP_PRIVILEGES,
    LOCK_NAMESPACE,
    BackupTool,
    Provider,
    Release,
    no_engine_preparation,
    server_url,
    url_query,
)

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.engine import Dialect

    from migrator.secrets import ConnectionInfo
    from migrator.targets import Target
    from migrator.verify import GrantCheck

# pg_advisory_lock takes one bigint; derive it from the namespace so that it does not collide
# with advisory locks an application takes for its own purposes.
LOCK_KEY = int.from_bytes(hashlib.sha256(LOCK_NAMESPACE.encode()).digest()[:8], "big", signed=True)
# lock_not_available: lock_timeout ended a wait.
LOCK_NOT_AVAILABLE = "55P03"


# --- Reaching it, its migration lock ----------------------------------------------------------


def _auth_failed(error: BaseException) -> bool:
    # libpq reports a rejected login only in the message text, not as an SQLSTATE.
    message = str(error)
    return getattr(error, "sqlstate", None) in ("28P01", "28000") or any(
        phrase in message
        for phrase in ("password authentication failed", "no pg_hba.conf entry", 'role "')
    )


def _database_missing(error: BaseException) -> bool:
    # invalid_catalog_name, which libpq reports in the message only when connecting.
    return getattr(error, "sqlstate", None) == "3D000" or bool(
        re.search(r'database "[^"]*" does not exist', str(error))
    )


def _connect_denied(error: BaseException) -> bool:
    # insufficient_privilege: the role lacks CONNECT on the database.
    return getattr(error, "sqlstate", None) == "42501"


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
        **_dead_client_settings(dialect),
    }


def _dead_client_settings(dialect: Dialect) -> dict[str, str]:
    # A worker host that vanished (power lost, a partition) closes no connection: the server
    # kept its session, and the run's migration lock with it, until the operating system's
    # TCP keepalives gave up (over two hours on Linux), and recovery leaves a run whose lock is
    # held running. The server's keepalives on this session (it probes; the worker's kernel
    # answers, however busy the process) end it within about 3/4 of RUN_STALE_AFTER_SECONDS
    # of silence, and tcp_user_timeout likewise when the server's data goes unacknowledged.
    stale = settings.RUN_STALE_AFTER_SECONDS
    idle, interval, count = max(1, stale // 4), max(1, stale // 8), 4
    values = {
        "tcp_keepalives_idle": str(idle),
        "tcp_keepalives_interval": str(interval),
        "tcp_keepalives_count": str(count),
    }
    if (getattr(dialect, "server_version_info", None) or (0,)) >= (12,):
        values["tcp_user_timeout"] = f"{idle + interval * count}s"
    return values


def _lock_wait(error: BaseException) -> tuple[str, str] | None:
    if getattr(error, "sqlstate", None) != LOCK_NOT_AVAILABLE:
        return None
    return "MIGRATION_PG_LOCK_TIMEOUT", str(settings.MIGRATION_PG_LOCK_TIMEOUT)


def _autocommit(connection: Connection, on: bool) -> bool | None:
    # psycopg switches without a word to the server, between transactions only: a connection
    # in one, or lost, stays as it is (so does one of another driver, an `alembic` CLI URL's).
    if connection.closed or connection.invalidated:
        return None
    driver = connection.connection.dbapi_connection
    status = getattr(getattr(driver, "info", None), "transaction_status", None)
    if status != TransactionStatus.IDLE:
        return None
    before = driver.autocommit
    if before != on:
        driver.autocommit = on
    return before


def _take_lock(
    connection: Connection, timeout: float, session_settings: Mapping[str, str]
) -> Release | None:
    # A session-level advisory lock outlives the per-revision transactions. Nobody else holds
    # it, the usual case: one statement takes it and sets the session's settings (in autocommit,
    # ``providers.autocommit``: one round trip). Otherwise the wait is bounded by lock_timeout
    # rather than by polling pg_try_advisory_lock, so waiting runs queue fairly.
    params = {"key": LOCK_KEY}
    assignments = ""
    for index, (name, value) in enumerate(session_settings.items()):
        assignments += f", pg_catalog.set_config(:name{index}, :value{index}, false)"
        params[f"name{index}"], params[f"value{index}"] = name, str(value)
    got = connection.execute(
        text(f"SELECT pg_catalog.pg_try_advisory_lock(:key){assignments}"), params
    ).scalar()
    if not got and timeout > 0:
        if not _wait_for_lock(connection, timeout):
            return None
        got = True
    if not got:
        return None
    return lambda: connection.execute(
        text("SELECT pg_catalog.pg_advisory_unlock(:key)"), {"key": LOCK_KEY}
    )


def _wait_for_lock(connection: Connection, timeout: float) -> bool:
    # SET LOCAL, in a transaction of its own (a connection in autocommit leaves it for the
    # wait): the bounded wait ends with it, and the session's own lock_timeout and
    # statement_timeout are back. The statement timeout is off for the wait alone: lock_timeout
    # bounds it. False when lock_timeout ended the wait.
    before = _autocommit(connection, False)
    try:
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
            return False
        connection.commit()
        return True
    finally:
        if before is not None:
            _autocommit(connection, before)


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


# --- The catalog (schema) and the app user's grants (verify) ----------------------------------


# Every catalog entry PostgreSQL reflection reads for the tables SQLAlchemy lists without a
# schema (visible in the search_path, not pg_catalog, not temporary), one line each, as raw
# catalog values rather than deparsed text (``pg_get_indexdef`` and ``pg_get_constraintdef`` cost
# the server more than the rest of the query): each column with its number, type, not-null,
# default, identity and generation, and for a user-defined type (OIDs from 16384 up) an enum's
# labels or a domain's base type, default and checks, looked up for that column alone (a second
# pass over pg_attribute doubled the query's cost on a new backend); each index (its columns as
# column numbers, unique, primary, operator classes, options, collations, expressions,
# predicate); each constraint (kind, columns, backing index, referenced table and columns,
# actions). Names are in the lines, OIDs only where PostgreSQL fixes them (built-in types,
# operator classes, collations), so databases migrated alike have the same lines, and a digest
# seen before always means the same schema; a database with another history (a dropped column
# shifts the numbers) just gets a full read. A line is a row literal, so a NULL and an empty text
# differ. The server version is a line too: another major version may reflect the same catalog
# otherwise.
_CATALOG = """
WITH tables AS (
    SELECT c.oid, c.relnamespace::pg_catalog.regnamespace::text || '.' || c.relname AS name
    FROM pg_catalog.pg_class c
    WHERE c.relkind IN ('r', 'p') AND c.relpersistence <> 't'
      AND c.relnamespace <> 'pg_catalog'::pg_catalog.regnamespace
      AND pg_catalog.pg_table_is_visible(c.oid)
)
SELECT 'schema ' || coalesce(pg_catalog.current_schema(), '')
UNION ALL
SELECT 'server ' || pg_catalog.current_setting('server_version_num')
UNION ALL
SELECT ROW('column', t.name, a.attnum, a.attname,
    pg_catalog.format_type(a.atttypid, a.atttypmod), a.attnotnull, a.attidentity, a.attgenerated,
    pg_catalog.pg_get_expr(d.adbin, d.adrelid),
    CASE WHEN a.atttypid >= 16384 THEN (
        SELECT ROW(ty.typtype, pg_catalog.format_type(ty.typbasetype, ty.typtypmod), ty.typnotnull,
            ty.typdefault,
            (SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
             FROM pg_catalog.pg_enum e WHERE e.enumtypid = ty.oid),
            (SELECT string_agg(pg_catalog.pg_get_constraintdef(k.oid), ',' ORDER BY k.conname)
             FROM pg_catalog.pg_constraint k WHERE k.contypid = ty.oid))::text
        FROM pg_catalog.pg_type ty WHERE ty.oid = a.atttypid) END)::text
FROM tables t
JOIN pg_catalog.pg_attribute a ON a.attrelid = t.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
UNION ALL
SELECT ROW('index', t.name, i.indexrelid::pg_catalog.regclass::text, i.indisunique,
    i.indisprimary, i.indnkeyatts, i.indkey::text, i.indclass::text, i.indoption::text,
    i.indcollation::text, pg_catalog.pg_get_expr(i.indexprs, i.indrelid),
    pg_catalog.pg_get_expr(i.indpred, i.indrelid))::text
FROM tables t JOIN pg_catalog.pg_index i ON i.indrelid = t.oid
UNION ALL
SELECT ROW('constraint', t.name, k.conname, k.contype, k.conkey::text,
    k.conindid::pg_catalog.regclass::text, k.confrelid::pg_catalog.regclass::text,
    k.confkey::text, k.confupdtype, k.confdeltype, k.confmatchtype, k.condeferrable,
    k.condeferred)::text
FROM tables t JOIN pg_catalog.pg_constraint k ON k.conrelid = t.oid
"""


_NESTED_LOOPS = (
    "SELECT pg_catalog.set_config('enable_hashjoin', 'off', true), "
    "pg_catalog.set_config('enable_mergejoin', 'off', true)"
)


def _catalog_digest(connection: Connection) -> str:
    """sha256 of the catalog lines of ``_CATALOG``; sets the dialect's default schema.
    Leaves the connection in the transaction the query ran in (with nested loops set), if it
    is not in autocommit."""
    # Nested loops over the catalog indexes: a new backend plans and runs the query in half the
    # time it takes with hash joins, which need statistics read for every catalog it touches.
    # Both statements in one query string, one round trip: the server runs them in one
    # transaction, even in autocommit, and plans the catalog query after the settings are set.
    result = connection.exec_driver_sql(f"{_NESTED_LOOPS};{_CATALOG}")
    try:
        cursor = result.cursor
        cursor.nextset()  # past the settings' row, to the catalog's
        lines = sorted(row[0] for row in cursor.fetchall())
    finally:
        result.close()
    connection.dialect.default_schema_name = next(
        line.removeprefix("schema ") for line in lines if line.startswith("schema ")
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


# What the role may do, in one statement: its own attributes and its privileges on the database
# and the schema (``role``, evaluated once), then one row per table and sequence of the schema,
# in one scan of pg_class: SELECT, INSERT, UPDATE, DELETE and ownership for tables; for a
# sequence, whether INSERT may draw from it (USAGE or UPDATE; an identity column's sequence
# needs neither). The role is the app role named by :role, or the user logged in; when it does
# not exist, the one row has no relation and NULL privileges (the functions are strict).
_GRANTS = """
WITH role AS MATERIALIZED (
    SELECT r.rolname AS who, r.rolcanlogin, r.rolsuper,
        has_database_privilege(r.rolname, current_database(), 'CONNECT') AS can_connect,
        has_schema_privilege(r.rolname, :schema, 'USAGE') AS schema_usage,
        has_schema_privilege(r.rolname, :schema, 'CREATE') AS schema_create,
        has_database_privilege(r.rolname, current_database(), 'CREATE') AS database_create,
        current_database() AS database
    FROM (SELECT coalesce(CAST(:role AS name), current_user) AS name) asked
    LEFT JOIN pg_roles r ON r.rolname = asked.name
)
SELECT role.who IS NOT NULL, role.rolcanlogin, role.rolsuper, role.can_connect,
    role.schema_usage, role.schema_create, role.database_create, role.database,
    c.relname, c.relkind,
    c.relkind <> 'S' AND has_table_privilege(role.who, c.oid, 'SELECT'),
    c.relkind <> 'S' AND has_table_privilege(role.who, c.oid, 'INSERT'),
    c.relkind <> 'S' AND has_table_privilege(role.who, c.oid, 'UPDATE'),
    c.relkind <> 'S' AND has_table_privilege(role.who, c.oid, 'DELETE'),
    c.relkind <> 'S' AND pg_has_role(role.who, c.relowner, 'USAGE'),
    -- CASE: the server may test conditions in any order, and has_sequence_privilege raises on
    -- a relation that is not a sequence.
    CASE WHEN c.relkind = 'S' THEN has_sequence_privilege(role.who, c.oid, 'USAGE')
        OR has_sequence_privilege(role.who, c.oid, 'UPDATE')
        OR EXISTS (SELECT 1 FROM pg_depend d WHERE d.objid = c.oid AND d.deptype = 'i') END
FROM role
LEFT JOIN pg_class c ON role.who IS NOT NULL AND c.relnamespace = to_regnamespace(:schema)
    AND c.relkind IN ('r', 'p', 'S')
ORDER BY c.relname
"""


def _app_grants(
    connection: Connection,
    check: GrantCheck,
    tables: list[str],
    *,
    namespace: str | None,
    database: str | None,
    role: str | None = None,
) -> bool:
    """has_table_privilege / has_sequence_privilege / has_schema_privilege /
    has_database_privilege for ``role``, or for the current (app) user when None, in one
    statement, on the tables of schema ``namespace`` (``public`` when None). False when there
    is no such role (nothing checked)."""
    namespace = namespace or "public"
    rows = connection.execute(text(_GRANTS), {"schema": namespace, "role": role}).all()
    exists, can_login, superuser, connect, usage, create_in_schema, create_in_database, database = (
        rows[0][:8]
    )
    if not exists:
        return False
    if not can_login:
        check.missing[f"role {role or check.username}"] = ["LOGIN"]
    if not connect:
        check.missing[f"database {database}"] = ["CONNECT"]
    if not usage:
        check.missing[f"schema {namespace}"] = ["USAGE"]
    if superuser:
        check.excess.append("superuser")
    if create_in_database:
        check.excess.append(f"CREATE on database {database}")
    if create_in_schema:
        check.excess.append(f"CREATE on schema {namespace}")

    privileges = {}
    owned = []
    for name, kind, *flags, owner, sequence_ok in (row[8:] for row in rows):
        if name is None:  # a schema with no table or sequence
            continue
        if kind == "S":
            if not sequence_ok:
                check.missing[f"sequence {name}"] = ["USAGE"]
            continue
        privileges[name] = flags
        if owner and not superuser:
            owned.append(name)
    for table in tables:
        flags = privileges.get(table, [False] * len(APP_PRIVILEGES))
        lacking = [p for p, granted in zip(APP_PRIVILEGES, flags, strict=True) if not granted]
        if lacking:
            check.missing[table] = lacking
    if owned:
        check.excess.append(f"owns table {', '.join(sorted(owned))} (may ALTER or DROP)")
    return True


def _drop_database(name: str) -> str:
    # FORCE: a scratch database's last session may not have ended yet.
    return f"DROP DATABASE IF EXISTS {_quote(name)} WITH (FORCE)"


# --- Backups: pg_dump and pg_restore ----------------------------------------------------------

# libpq connection keywords that carry a secret: never written into a connection string.
_CONNINFO_SECRETS = ("password", "passfile", "sslpassword")


def pg_conninfo(info: ConnectionInfo) -> str:
    """A libpq connection string for ``info`` without the password (that goes in
    ``PGPASSWORD``): host, port, database, user, the secret's ``options`` (``sslmode``...)."""
    values = {
        "host": info.host,
        "port": info.port,
        "dbname": info.database,
        "user": info.username,
        "connect_timeout": settings.DATABASE_CONNECT_TIMEOUT,
        "application_name": "tenant-migrations-backup",
    }
    for key, value in info.options.items():
        if str(key).lower() not in _CONNINFO_SECRETS:
            values[str(key)] = value
    return " ".join(
        f"{key}={_pg_quote(str(value))}" for key, value in values.items() if value is not None
    )


def _pg_quote(value: str) -> str:
    # libpq's conninfo syntax: single quotes, with \ and ' escaped by a backslash.
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def pg_dump_command(info: ConnectionInfo, binary: str = "pg_dump") -> list[str]:
    """The argv of ``pg_dump`` for ``info``: custom format to stdout, never prompting, giving up
    on a table lock after MIGRATION_LOCK_TIMEOUT seconds, as the secret's ``owner_role`` when it
    names one (``--role``: SET ROLE, as a migration does). No password in it."""
    return [
        binary,
        "--format=custom",
        "--no-password",
        f"--lock-wait-timeout={settings.MIGRATION_LOCK_TIMEOUT * 1000}",
        *_pg_role(info),
        f"--dbname={pg_conninfo(info)}",
    ]


def _pg_role(info: ConnectionInfo) -> list[str]:
    # What a restore creates must belong to the owner role, not to a user Vault made for it
    # (which it could not drop afterwards).
    return [f"--role={info.owner_role}"] if info.owner_role else []


def pg_restore_command(info: ConnectionInfo, path: str, binary: str = "pg_restore") -> list[str]:
    """The argv of ``pg_restore`` putting ``path`` back into ``info``'s database: dropping what
    the backup holds first, in one transaction (all or nothing), as the secret's ``owner_role``
    when it names one (``--role``). No password in it."""
    return [
        binary,
        "--clean",
        "--if-exists",
        "--no-owner",
        "--single-transaction",
        "--exit-on-error",
        "--no-password",
        *_pg_role(info),
        f"--dbname={pg_conninfo(info)}",
        str(path),
    ]


def pg_environment(info: ConnectionInfo) -> dict[str, str]:
    """The environment of ``pg_dump`` and ``pg_restore``: this process's, with the admin
    password in ``PGPASSWORD`` (visible to this user and root only, unlike argv)."""
    env = {key: value for key, value in os.environ.items() if key != "PGPASSWORD"}
    if info.password is not None:
        env["PGPASSWORD"] = info.password.reveal()
    return env


def parse_pg_version(text: str) -> tuple[int, ...] | None:
    """(major,) or (major, minor) for a release before 10, from ``pg_dump --version``."""
    match = re.search(r"\b(\d+)(?:\.(\d+))?", text)
    if match is None:
        return None
    major = int(match[1])
    if major < 10 and match[2] is not None:
        return (major, int(match[2]))
    return (major,)


def _pg_major(version: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(version[:2]) if version[0] < 10 else tuple(version[:1])


def _dump(target: Target, out: Path) -> None:
    info = target.connection
    binary = toolchain.find_tool(target, BackupFailed, "pg_dump", package="postgresql-client")
    _check_pg_dump_version(target, binary)
    with toolchain.new_file(out) as file:
        toolchain.run_tool(
            target,
            "pg_dump",
            pg_dump_command(info, binary),
            env=pg_environment(info),
            stdout=file,
            error=BackupFailed,
            doing="Backing up",
            hint="Check that pg_dump is of the server's major version or newer, that the admin "
            "user may read every table, sequence and schema of the database (a table owned by "
            "another role stops the dump), and that BACKUP_DIR has free space.",
        )
    toolchain.not_empty(target, "pg_dump", out)


def _check_pg_dump_version(target: Target, binary: str) -> None:
    """pg_dump refuses a server newer than itself; say so clearly before it does."""
    completed = toolchain.run_tool(
        target,
        "pg_dump",
        [binary, "--version"],
        env=dict(os.environ),
        error=BackupFailed,
        doing="Checking the version of",
        hint="Check the PostgreSQL client installation.",
    )
    client = parse_pg_version(completed.stdout.decode(errors="replace"))
    try:
        with engines.connect(target) as connection:
            server = tuple(connection.dialect.server_version_info or ())
    except sa_exc.DBAPIError as exc:
        raise BackupFailed(
            f"Cannot read the server version of {target.name}: "
            f"{engines.error_reason(exc, target.connection)}"
        ) from None
    if client and server and _pg_major(client) < _pg_major(server):
        client_text = ".".join(map(str, client))
        server_text = ".".join(map(str, server))
        raise BackupFailed(
            f"pg_dump at {binary} is version {client_text}, older than the PostgreSQL server of "
            f"{target.name} ({server_text}): pg_dump must be of the server's major version or "
            f"newer. Install postgresql-client-{_pg_major(server)[0]} (or newer) or put its bin "
            "directory first on PATH."
        )


def _restore(target: Target, path: str) -> None:
    info = target.connection
    binary = toolchain.find_tool(target, RestoreFailed, "pg_restore", package="postgresql-client")
    toolchain.run_tool(
        target,
        "pg_restore",
        pg_restore_command(info, path, binary),
        env=pg_environment(info),
        error=RestoreFailed,
        doing="Restoring",
        hint="Nothing was changed (one transaction). Check that pg_restore is at least the "
        "version of the pg_dump that wrote the file and that the admin user owns the objects "
        "the backup holds.",
    )


def _tables_in(target: Target, path: str) -> set[str]:
    binary = toolchain.find_tool(target, RestoreFailed, "pg_restore", package="postgresql-client")
    listing = toolchain.run_tool(
        target,
        "pg_restore",
        [binary, "--list", str(path)],
        env=dict(os.environ),
        error=RestoreFailed,
        doing="Listing",
        hint="",
    ).stdout.decode(errors="replace")
    # "215; 1259 16390 TABLE public accounts owner"
    return {
        match[2]
        for match in re.finditer(r"^\d+; \d+ \d+ TABLE (\S+) (\S+) ", listing, re.MULTILINE)
        if match[1] == "public"
    }


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
    database_missing=_database_missing,
    connect_denied=_connect_denied,
    server_engine=True,
    prepare_engine=no_engine_preparation,
    # psycopg's hstore adapter would be registered with the OIDs of the first database the
    # engine saw; SQLAlchemy's own HSTORE conversion works the same on every database.
    server_engine_options={"use_native_hstore": False},
    schema_is_database=False,
    refresh_default_schema=_refresh_default_schema,
    owner_role=True,
    autocommit=_autocommit,
    take_lock=_take_lock,
    lock_held=_lock_held,
    session_lock=True,
    session_settings=_session_settings,
    lock_wait=_lock_wait,
    catalog_digest=_catalog_digest,
    unique_constraints_are_indexes=False,
    scratch_setting="VERIFY_SCRATCH_POSTGRES_URL",
    drop_database=_drop_database,
    app_grants=_app_grants,
    # has_table_privilege(role, ...) answers for any role: asked on the admin connection.
    grants_asked_as_admin=True,
    grants_login_database=None,
    waited_lock="a lock",
    find_session="in pg_stat_activity",
    transactional_ddl=True,
    partial_ddl="",
    backup=BackupTool(
        extension="dump",
        dump=_dump,
        dump_on_server=None,
        restore=_restore,
        tables_in=_tables_in,
    ),
    quote=_quote,
)
