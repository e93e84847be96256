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

Each provider's tool is its ``backup`` in ``migrator.providers`` (``providers.postgresql`` holds
pg_dump's command line, and so on); this module decides when to back up, where the files go,
how long they are kept, and checks a file before it is restored.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect

from migrator import engines, locks, providers, runner
from migrator.exceptions import BackupFailed, MigratorError, RestoreFailed
from migrator.providers.toolchain import backup_file_name
from migrator.targets import Target

logger = logging.getLogger("migrator.backups")

_FILE_NAME = re.compile(r"(?P<stamp>\d{8}T\d{6}Z)-run(?P<run>\d+)\.[a-z0-9]+\Z")


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


def required(policy: str, kind: str) -> bool:
    """Whether runs on a target of ``kind`` (shared, dedicated, external) whose backup policy is
    ``policy`` back it up before changing it: the policy when "on" or "off", the setting for its
    kind when "inherit"."""
    if policy == "on":
        return True
    if policy == "off":
        return False
    return policy_default(kind)


# --- Backup before a run ----------------------------------------------------------------------


def backup_before_run(target: Target, *, run_id: int, kind: str, revision: str) -> Backup | None:
    """Back ``target`` up before run ``run_id`` changes it (to ``revision``, by ``kind``).

    An upgrade with nothing pending takes no backup and returns None: there is nothing to undo
    (``runner.pending``, one read of ``alembic_version``). A downgrade always takes one. On
    success deletes the target's backups beyond BACKUP_RETENTION and returns the ``Backup``
    (path, size, sha256, duration, and the revision it holds). Raises ``BackupFailed``
    otherwise, before anything was applied.
    """
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
        backup = take_backup(target, run_id=run_id, revision=stands)
    except BackupFailed as exc:
        raise BackupFailed(
            f"{exc} The run stopped before applying anything: {target.name} is unchanged. Fix "
            "the backup, or set the target's backup policy to 'off' to migrate without one."
        ) from None
    logger.info(
        "Backed up %s to %s (%s bytes) in %sms",
        target.name,
        backup.path,
        backup.size if backup.size is not None else "?",
        backup.duration_ms,
    )
    if not providers.get(target.provider).backup.on_server:
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
    tool = providers.get(target.provider).backup
    started = time.monotonic()
    if tool.on_server:
        path = tool.dump_on_server(target, run_id)
        return Backup(target.name, path, None, "", runner.elapsed_ms(started), revision)
    directory = _prepare_directory(target.name)
    final = directory / backup_file_name(run_id, tool.extension)
    partial = final.with_name(final.name + ".partial")
    try:
        tool.dump(target, partial)
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
        runner.elapsed_ms(started),
        revision,
    )


# --- Restore ----------------------------------------------------------------------------------


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
    tool = providers.get(target.provider).backup
    if not tool.on_server:
        check_backup_file(path, checksum)
    result.revision_before = runner.current(target).revision
    result.log.append(
        f"Restoring {target.name} from {path}; it stands at {result.revision_before or 'base'}"
    )
    if tool.on_server:
        # The server restores its own file, with the database single-user: no migration lock.
        tool.restore(target, path)
    else:
        with _locked(target):
            tool.restore(target, path)
        result.left_in_place = _tables_not_in_backup(target, path, tool)
    result.revision_after = runner.current(target).revision
    result.duration_ms = runner.elapsed_ms(started)
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


# --- What a restore left in place -------------------------------------------------------------


def _tables_not_in_backup(target: Target, path: str, tool: providers.BackupTool) -> list[str]:
    """Tables of the database's default schema that the backup does not hold."""
    try:
        in_backup = tool.tables_in(target, path)
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
