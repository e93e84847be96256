"""Backups of a target database before a run changes it, and restores of those backups.

A run backs its target up first when the target's policy asks for it (``required``) and the run
would change something: an upgrade with pending revisions, or any downgrade. The backup is taken
with the admin credentials the run read from Vault, by each provider's own tool:

* PostgreSQL: ``pg_dump --format=custom``, restored with ``pg_restore --clean --if-exists
  --no-owner --single-transaction``. The password reaches them in ``PGPASSWORD``.
* MySQL/MariaDB: ``mysqldump --single-transaction --routines --triggers``, restored with
  ``mysql``. The password reaches them in a ``--defaults-extra-file`` only this user can read.
* SQLite: a consistent copy through SQLite's online backup API (``sqlite3.Connection.backup``).
* SQL Server: ``BACKUP DATABASE ... WITH COPY_ONLY, INIT, CHECKSUM``, written by the server to
  MSSQL_BACKUP_DIR on its own host (``RESTORE DATABASE`` puts it back).

A password never appears in a command line (any user of the host can read those in ``ps``) nor
in an error. Files go to ``BACKUP_DIR/<target>/<UTC timestamp>-run<id>.<ext>``, directories 0700
and files 0600; the newest BACKUP_RETENTION per target are kept. A backup that fails raises
``BackupFailed`` before any DDL ran: the run fails and the target is left as it was. Every tool
runs under a timeout of MIGRATION_TASK_TIMEOUT seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect

from migrator import engines, locks, runner
from migrator.exceptions import BackupFailed, MigratorError, RestoreFailed
from migrator.redaction import redact
from migrator.targets import Target

if TYPE_CHECKING:
    from migrator.secrets import ConnectionInfo

logger = logging.getLogger("migrator.backups")

EXTENSIONS = {"postgresql": "dump", "mysql": "sql", "sqlite": "sqlite3", "sqlserver": "bak"}
_FILE_NAME = re.compile(r"(?P<stamp>\d{8}T\d{6}Z)-run(?P<run>\d+)\.[a-z0-9]+\Z")
_STAMP = "%Y%m%dT%H%M%SZ"
_STDERR_CHARS = 1500
# libpq connection keywords that carry a secret: never written into a connection string.
_PG_SECRET_KEYWORDS = ("password", "passfile", "sslpassword")


@dataclass(frozen=True)
class Backup:
    """One backup of one target. ``path`` is a local file, except for SQL Server, where it is
    the file on the server's host (``size`` None and ``checksum`` empty: the server checksums
    its own backups). ``revision`` is where the target stood (None: base)."""

    target: str
    path: str
    size: int | None
    checksum: str  # sha256 of the file, hex
    duration_ms: int
    revision: str | None = None


@dataclass
class RestoreResult:
    """What one restore did: the revision read back before and after, and its log lines."""

    target: str
    path: str
    revision_before: str | None = None
    revision_after: str | None = None
    duration_ms: int = 0
    log: list[str] = field(default_factory=list)
    # Tables in the database that the backup does not hold: created after it, left in place.
    left_in_place: list[str] = field(default_factory=list)


# --- Policy -----------------------------------------------------------------------------------


def policy_default(kind: str) -> bool:
    """The BACKUP_BEFORE_MIGRATION_* setting for targets of ``kind`` (shared, dedicated,
    external)."""
    return {
        "shared": settings.BACKUP_BEFORE_MIGRATION_SHARED,
        "dedicated": settings.BACKUP_BEFORE_MIGRATION_DEDICATED,
        "external": settings.BACKUP_BEFORE_MIGRATION_EXTERNAL,
    }.get(kind, False)


def required(record) -> bool:
    """Whether runs on ``record`` (a ``MigrationTarget``) back it up before changing it: its
    ``backup_policy`` when "on" or "off", the setting for its kind when "inherit"."""
    if record.backup_policy == "on":
        return True
    if record.backup_policy == "off":
        return False
    return policy_default(record.kind)


# --- Backup before a run ----------------------------------------------------------------------


def backup_before_run(target: Target, record, run, *, kind: str, revision: str) -> Backup | None:
    """Back ``target`` up before ``run`` changes it; record the backup on the run.

    An upgrade with nothing pending takes no backup and returns None: there is nothing to undo
    (``runner.pending``, one read of ``alembic_version``). A downgrade always takes one. On
    success records path, size, sha256, duration and the revision on the run
    (``tenants.actions.do_record_backup``), deletes the target's backups beyond
    BACKUP_RETENTION and returns the ``Backup``. Raises ``BackupFailed`` otherwise, before
    anything was applied.
    """
    from tenants import actions

    if kind == runner.UPGRADE:
        pending = runner.pending(target, revision)
        if not pending.revisions:
            return None
        stands = pending.current
    elif kind == runner.DOWNGRADE:
        stands = runner.current(target).revision
    else:
        return None
    try:
        backup = take_backup(target, run_id=run.pk, revision=stands)
    except BackupFailed as exc:
        raise BackupFailed(
            f"{exc} The run stopped before applying anything: {target.name} is unchanged. Fix "
            "the backup, or set the target's backup policy to 'off' to migrate without one."
        ) from None
    actions.do_record_backup(run, backup)
    logger.info(
        "Backed up %s to %s (%s bytes) in %sms",
        target.name,
        backup.path,
        backup.size if backup.size is not None else "?",
        backup.duration_ms,
    )
    if target.provider != "sqlserver":
        for path in apply_retention(backup_directory(target.name), settings.BACKUP_RETENTION):
            logger.info("Deleted %s (BACKUP_RETENTION=%s)", path, settings.BACKUP_RETENTION)
    return backup


def take_backup(target: Target, *, run_id: int, revision: str | None = None) -> Backup:
    """Back up the database of ``target`` as its admin user; returns the ``Backup``.

    Writes ``BACKUP_DIR/<target>/<timestamp>-run<run_id>.<ext>`` (SQL Server: a file in
    MSSQL_BACKUP_DIR on the server). The file appears only once complete (written as
    ``.partial``, then renamed). Raises ``BackupFailed`` with the tool, its exit status and its
    redacted error output, and what to check.
    """
    provider = target.provider
    started = time.monotonic()
    if provider == "sqlserver":
        path = mssql_backup_path(target.name, run_id)
        _mssql_execute(
            target,
            [mssql_backup_statement(target.connection.database, path)],
            error=BackupFailed,
            doing="Backing up",
            hint="Check that the admin user may BACKUP DATABASE (db_backupoperator) and that "
            f"the SQL Server service account may write to MSSQL_BACKUP_DIR ({path}).",
        )
        return Backup(target.name, path, None, "", _elapsed_ms(started), revision)
    if provider not in EXTENSIONS:
        raise BackupFailed(f"No backup method for provider {provider!r} of {target.name}.")
    directory = _prepare_directory(target.name)
    final = directory / backup_file_name(run_id, EXTENSIONS[provider])
    partial = final.with_name(final.name + ".partial")
    try:
        if provider == "postgresql":
            _pg_dump(target, partial)
        elif provider == "mysql":
            _mysqldump(target, partial)
        else:
            _sqlite_backup(target, partial)
        os.replace(partial, final)
    except OSError as exc:
        raise BackupFailed(_disk_message(target.name, partial, exc)) from None
    finally:
        partial.unlink(missing_ok=True)
    return Backup(
        target.name,
        str(final),
        final.stat().st_size,
        file_checksum(final),
        _elapsed_ms(started),
        revision,
    )


# --- Restore ----------------------------------------------------------------------------------


def restore_run(run, *, backup_run):
    """Execute the restore ``run`` (kind "restore", running): put the backup taken before
    ``backup_run`` back into the target, with the admin credentials read from Vault at
    ``{mount}/data/{secrets path}/{target.effective_vault_path}``, and record the outcome through
    ``tenants.actions``. Returns the run as recorded; a failed restore is recorded on the run
    (``restore_failed`` and friends), never raised. Writes heartbeats while it works, so the
    recovery schedule can tell a live restore from a dead one.
    """
    from migrator.secrets import get_secrets_manager
    from migrator.tasks import heartbeat
    from tenants import actions

    record = run.target
    started = time.monotonic()
    try:
        with heartbeat(run.pk):
            # Fresh from Vault, as for a migration: a restore goes to the database the
            # secret names now.
            with get_secrets_manager().admin_credentials(
                record.effective_vault_path, provider=record.provider, fresh=True
            ) as admin:
                result = restore(
                    Target(record.name, admin.connection),
                    backup_run.backup_path,
                    checksum=backup_run.backup_checksum,
                )
    except MigratorError as exc:
        error = exc
    except Exception as exc:  # noqa: BLE001 - recorded on the run, never lost
        logger.exception("Unexpected error in restore run %s for %s", run.pk, record.name)
        error = RestoreFailed(f"Unexpected error ({type(exc).__name__}): {redact(str(exc))}")
    else:
        return actions.do_record_restore(run, result, heads=runner.heads())
    logger.error("%s", error)
    return actions.do_record_run_failure(
        run, error, heads=runner.heads(), duration_ms=_elapsed_ms(started)
    )


def restore(target: Target, path: str, *, checksum: str = "") -> RestoreResult:
    """Restore the backup at ``path`` into the database of ``target``, as its admin user.

    Checks the file's sha256 against ``checksum`` first (``RestoreFailed`` when it differs).
    Holds the target-level lock (``migrator.locks``) while the tool runs, so no migration runs
    meanwhile; for SQL Server the database is put in single-user mode instead. Reads the
    revision back before and after. What the backup does not hold (a table created after it)
    is left in place and listed in ``left_in_place`` and the log.
    """
    started = time.monotonic()
    result = RestoreResult(target.name, path)
    provider = target.provider
    if provider != "sqlserver":
        check_backup_file(path, checksum)
    result.revision_before = runner.current(target).revision
    result.log.append(
        f"Restoring {target.name} from {path}; it stands at {result.revision_before or 'base'}"
    )
    if provider == "sqlserver":
        _mssql_restore(target, path)
    else:
        with _locked(target):
            if provider == "postgresql":
                _pg_restore(target, path)
            elif provider == "mysql":
                _mysql_restore(target, path)
            elif provider == "sqlite":
                _sqlite_restore(target, path)
            else:
                raise RestoreFailed(f"No restore method for provider {provider!r}.")
        result.left_in_place = _tables_not_in_backup(target, path)
    result.revision_after = runner.current(target).revision
    result.duration_ms = _elapsed_ms(started)
    result.log.append(
        f"Restored {target.name} in {result.duration_ms}ms; it now stands at "
        f"{result.revision_after or 'base'}"
    )
    if result.left_in_place:
        result.log.append(
            f"Left in place, not in the backup (created after it): "
            f"{', '.join(result.left_in_place)}. Drop them before migrating again, or the "
            "revision that creates them will fail."
        )
    return result


def check_backup_file(path: str, checksum: str) -> Path:
    """The backup file at ``path``, after checking it exists and its sha256 is ``checksum``
    (when one was recorded). Raises ``RestoreFailed`` otherwise."""
    file = Path(path)
    if not file.is_file():
        raise RestoreFailed(
            f"The backup file {path} no longer exists: it was deleted (the newest "
            f"BACKUP_RETENTION={settings.BACKUP_RETENTION} backups of each target are kept) or "
            "moved. Choose the run of a newer backup."
        )
    if checksum:
        actual = file_checksum(file)
        if actual != checksum:
            raise RestoreFailed(
                f"The backup file {path} was altered since it was written: its sha256 is "
                f"{actual}, the run recorded {checksum}. Refusing to restore it."
            )
    return file


@contextmanager
def _locked(target: Target) -> Iterator[None]:
    """Hold ``target``'s migration lock for the block, on a connection of its own."""
    try:
        with (
            engines.connect(target) as connection,
            locks.target_lock(
                connection, timeout=settings.MIGRATION_LOCK_TIMEOUT, target_name=target.name
            ),
        ):
            yield
    except sa_exc.DBAPIError as exc:
        reason = engines.error_reason(exc, target.connection)
        raise RestoreFailed(f"Database error on {target.name}: {reason}") from None


# --- Files ------------------------------------------------------------------------------------


def backup_directory(target_name: str) -> Path:
    """``BACKUP_DIR/<target_name>``: where the target's backups are kept."""
    return Path(settings.BACKUP_DIR) / target_name


def backup_file_name(run_id: int, extension: str, *, now: datetime | None = None) -> str:
    """``<UTC timestamp>-run<run_id>.<extension>``, e.g. ``20250106T091500Z-run17.dump``."""
    now = now or datetime.now(tz=UTC)
    return f"{now.astimezone(UTC).strftime(_STAMP)}-run{run_id}.{extension}"


def apply_retention(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` backups in ``directory``; returns what was deleted.

    Only files named like ``backup_file_name`` count; anything else there is left alone. Newest
    is by the timestamp in the name, then the run id. ``keep`` below 1 keeps every backup.
    """
    if keep < 1 or not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _FILE_NAME.fullmatch(path.name)
        if match and path.is_file():
            found.append(((match["stamp"], int(match["run"])), path))
    found.sort(reverse=True)
    deleted = []
    for _, path in found[keep:]:
        try:
            path.unlink()
        except OSError as exc:
            logger.warning("Could not delete the old backup %s: %s", path, exc.strerror)
        else:
            deleted.append(path)
    return deleted


def file_checksum(path: Path | str) -> str:
    """The sha256 of the file at ``path``, in hex."""
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _prepare_directory(target_name: str) -> Path:
    root = Path(settings.BACKUP_DIR)
    directory = root / target_name
    try:
        if not root.exists():
            root.mkdir(mode=0o700, parents=True)
        directory.mkdir(mode=0o700, exist_ok=True)
        directory.chmod(0o700)
    except OSError as exc:
        raise BackupFailed(_disk_message(target_name, directory, exc)) from None
    return directory


def _disk_message(target_name: str, path: Path, error: OSError) -> str:
    return (
        f"Cannot write the backup of {target_name} to {path} "
        f"({error.strerror or type(error).__name__}). Check that BACKUP_DIR "
        f"({settings.BACKUP_DIR}) is a directory this process may write to and that its disk "
        "has free space."
    )


@contextmanager
def _new_file(path: Path) -> Iterator:
    """A new file at ``path`` readable and writable by this user only (0600), open for writing."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        yield file


# --- PostgreSQL -------------------------------------------------------------------------------


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
        if str(key).lower() not in _PG_SECRET_KEYWORDS:
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


def _pg_dump(target: Target, out: Path) -> None:
    info = target.connection
    binary = _tool(target, BackupFailed, "pg_dump", package="postgresql-client")
    _check_pg_dump_version(target, binary)
    with _new_file(out) as file:
        _run_tool(
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
    _not_empty(target, "pg_dump", out)


def _check_pg_dump_version(target: Target, binary: str) -> None:
    """pg_dump refuses a server newer than itself; say so clearly before it does."""
    completed = _run_tool(
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


def _pg_restore(target: Target, path: str) -> None:
    info = target.connection
    binary = _tool(target, RestoreFailed, "pg_restore", package="postgresql-client")
    _run_tool(
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


# --- MySQL / MariaDB --------------------------------------------------------------------------


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
        with _new_file(path) as file:
            file.write(mysql_option_file_text(info).encode())
        yield str(path)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _mysql_environment() -> dict[str, str]:
    # The option file is the one source of the password: an inherited MYSQL_PWD must not win.
    return {key: value for key, value in os.environ.items() if key != "MYSQL_PWD"}


def _mysqldump(target: Target, out: Path) -> None:
    info = target.connection
    binary = _tool(target, BackupFailed, "mysqldump", "mariadb-dump", package="mariadb-client")
    with mysql_option_file(info) as option_file, _new_file(out) as file:
        _run_tool(
            target,
            "mysqldump",
            mysqldump_command(info, option_file, binary),
            env=_mysql_environment(),
            stdout=file,
            error=BackupFailed,
            doing="Backing up",
            hint="Check that the admin user has SELECT, SHOW VIEW, TRIGGER, LOCK TABLES and "
            "EXECUTE on the database, that the DEFINER of every view and routine exists, and "
            "that BACKUP_DIR has free space.",
        )
    _not_empty(target, "mysqldump", out)


def _mysql_restore(target: Target, path: str) -> None:
    info = target.connection
    binary = _tool(target, RestoreFailed, "mysql", "mariadb", package="mariadb-client")
    with mysql_option_file(info) as option_file, open(path, "rb") as dump:
        _run_tool(
            target,
            "mysql",
            mysql_restore_command(info, option_file, binary),
            env=_mysql_environment(),
            stdin=dump,
            error=RestoreFailed,
            doing="Restoring",
            hint="MySQL and MariaDB commit each statement at once: the tables before the one "
            "that failed were restored. Fix the cause and restore again.",
        )


# --- SQLite -----------------------------------------------------------------------------------


def _sqlite_uri(path: str, mode: str) -> str:
    return f"{Path(path).resolve().as_uri()}?mode={mode}"


def _sqlite_file(target: Target, error: type[MigratorError]) -> str:
    database = target.connection.database
    if database == ":memory:" or "mode=memory" in database:
        raise error(f"{target.name} is an in-memory SQLite database: there is no file to copy.")
    return database


def _sqlite_backup(target: Target, out: Path) -> None:
    source = _sqlite_file(target, BackupFailed)
    with _new_file(out):
        pass  # created 0600; SQLite writes into it
    if not Path(source).exists():
        return  # nothing yet: the empty file is an empty database, which is what restores
    try:
        with (
            closing(sqlite3.connect(_sqlite_uri(source, "ro"), uri=True, timeout=_busy())) as src,
            closing(sqlite3.connect(out)) as dest,
        ):
            src.backup(dest)
    except sqlite3.Error as exc:
        raise BackupFailed(
            f"Backing up {target.name} failed: SQLite could not copy {source} ({exc}). Check "
            "that the file is a SQLite database this process may read."
        ) from None


def _sqlite_restore(target: Target, path: str) -> None:
    database = _sqlite_file(target, RestoreFailed)
    try:
        with (
            closing(sqlite3.connect(_sqlite_uri(path, "ro"), uri=True)) as src,
            closing(sqlite3.connect(database, timeout=_busy())) as dest,
        ):
            src.backup(dest)
    except sqlite3.Error as exc:
        raise RestoreFailed(
            f"Restoring {target.name} failed: SQLite could not copy {path} into {database} ({exc})."
        ) from None


def _busy() -> float:
    return float(settings.DATABASE_CONNECT_TIMEOUT)


# --- SQL Server -------------------------------------------------------------------------------


def quote_mssql_identifier(name: str) -> str:
    """``name`` as a bracketed T-SQL identifier: ``]`` doubled, so nothing can close it early."""
    if not name or "\x00" in name:
        raise ValueError("A SQL Server identifier must be non-empty and without NUL")
    return "[" + name.replace("]", "]]") + "]"


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
    return f"{directory}{separator}{target_name}-{backup_file_name(run_id, 'bak', now=now)}"


def mssql_backup_statement(database: str, path: str) -> str:
    """``BACKUP DATABASE`` of ``database`` to ``path`` on the server: a copy-only backup (it
    leaves the server's own backup chain alone), overwriting the file, with page checksums."""
    return (
        f"BACKUP DATABASE {quote_mssql_identifier(database)} TO DISK = {mssql_string(path)} "
        "WITH COPY_ONLY, INIT, CHECKSUM"
    )


def mssql_restore_statements(database: str, path: str) -> list[str]:
    """The statements restoring ``database`` from ``path``, run from ``master`` in order: check
    the file, take the database to single-user (rolling back other sessions), restore over it,
    and open it again. Run the last one even when the restore fails."""
    name = quote_mssql_identifier(database)
    disk = mssql_string(path)
    return [
        f"RESTORE VERIFYONLY FROM DISK = {disk} WITH CHECKSUM",
        f"ALTER DATABASE {name} SET SINGLE_USER WITH ROLLBACK IMMEDIATE",
        f"RESTORE DATABASE {name} FROM DISK = {disk} WITH REPLACE, CHECKSUM",
        f"ALTER DATABASE {name} SET MULTI_USER",
    ]


def _mssql_restore(target: Target, path: str) -> None:
    # RESTORE cannot run from a session inside the database it replaces: connect to master.
    master = Target(target.name, replace(target.connection, database="master"))
    verify, single_user, restore_statement, multi_user = mssql_restore_statements(
        target.connection.database, path
    )
    hint = f"Check that {path} exists on the SQL Server host and the admin user may RESTORE."
    _mssql_execute(master, [verify], error=RestoreFailed, doing="Restoring", hint=hint)
    try:
        _mssql_execute(
            master,
            [single_user, restore_statement],
            error=RestoreFailed,
            doing="Restoring",
            hint=hint,
        )
    finally:
        _mssql_execute(master, [multi_user], error=RestoreFailed, doing="Restoring", hint=hint)


def _mssql_execute(target, statements, *, error, doing, hint) -> None:
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


# --- What a restore left in place -------------------------------------------------------------


def _tables_not_in_backup(target: Target, path: str) -> list[str]:
    """Tables of the database's default schema that the backup does not hold."""
    try:
        in_backup = _tables_in_backup(target, path)
    except (OSError, MigratorError) as exc:
        logger.warning("Could not list the tables of %s: %s", path, exc)
        return []
    if in_backup is None:
        return []
    try:
        with engines.connect(target) as connection:
            present = set(inspect(connection).get_table_names())
    except sa_exc.DBAPIError:
        return []
    return sorted(present - in_backup)


def _tables_in_backup(target: Target, path: str) -> set[str] | None:
    if target.provider == "postgresql":
        binary = _tool(target, RestoreFailed, "pg_restore", package="postgresql-client")
        listing = _run_tool(
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
    if target.provider == "mysql":
        names = set()
        with open(path, encoding="utf-8", errors="replace") as dump:
            for line in dump:
                match = re.match(r"CREATE TABLE `((?:[^`]|``)+)`", line)
                if match:
                    names.add(match[1].replace("``", "`"))
        return names
    return None  # SQLite: the copy replaced the whole file


# --- Running the tools ------------------------------------------------------------------------


def _tool(target: Target, error: type[MigratorError], *names: str, package: str) -> str:
    """The full path of the first of ``names`` on PATH."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise error(
        f"{names[0]} is not installed on this host (not on PATH), so {target.name} cannot be "
        f"backed up or restored: install {package}."
    )


def _run_tool(
    target: Target,
    tool: str,
    argv: list[str],
    *,
    env: dict[str, str],
    error: type[MigratorError],
    doing: str,
    hint: str,
    stdin=None,
    stdout=None,
) -> subprocess.CompletedProcess:
    """Run ``argv`` under MIGRATION_TASK_TIMEOUT; raise ``error`` naming the tool, its exit
    status and the end of its error output (redacted) when it fails."""
    timeout = settings.MIGRATION_TASK_TIMEOUT
    try:
        completed = subprocess.run(
            argv,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise error(
            f"{doing} {target.name} failed: {tool} did not finish within {timeout}s "
            f"(MIGRATION_TASK_TIMEOUT) and was stopped. {hint}"
        ) from None
    except OSError as exc:
        raise error(
            f"{doing} {target.name} failed: {tool} ({argv[0]}) could not be started "
            f"({exc.strerror or type(exc).__name__})."
        ) from None
    if completed.returncode != 0:
        if completed.returncode < 0:
            status = f"was killed by signal {-completed.returncode}"
        else:
            status = f"exited with status {completed.returncode}"
        said = _tool_output(completed.stderr, target.connection)
        raise error(
            f"{doing} {target.name} failed: {tool} {status}"
            + (f": {said}" if said else " and said nothing")
            + (f". {hint}" if hint else ".")
        )
    return completed


def _tool_output(stderr: bytes, info: ConnectionInfo) -> str:
    """The end of a tool's error output on one line, without any secret."""
    text = " ".join(stderr.decode(errors="replace").split())
    if info.password is not None and info.password.reveal():
        text = text.replace(info.password.reveal(), "**redacted**")
    text = redact(text)
    if len(text) > _STDERR_CHARS:
        text = "..." + text[-_STDERR_CHARS:]
    return text.rstrip(".")


def _not_empty(target: Target, tool: str, path: Path) -> None:
    if path.stat().st_size == 0:
        raise BackupFailed(
            f"Backing up {target.name} failed: {tool} exited with status 0 but wrote nothing. "
            f"Check that {tool} on PATH is the real client."
        )


def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)
