"""The pipeline: one run of one target, from its secret in Vault to its verified schema.

``run(target, intent, options)`` reads the admin credentials fresh from Vault, backs the target
up when asked, migrates it under its lock (``migrator.runner``), verifies the schema after an
upgrade that applied something, and returns an ``Outcome``: a value that says everything the
record needs. It knows no Django model and writes no record; ``migrator.tasks`` (the bridge)
records the ``Outcome`` with one action. What must be on record before the run ends (a user
Vault made for this run, a backup taken) is told to ``Options.listener`` as it happens.

``restore`` and ``verify`` are the same for a restore of a backup and for a check of a target
as it stands: they read the credentials, do the work, and return a value.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from migrator import backups, engines, locks, phases, rollback, runner, verify
from migrator.backups import Backup, RestoreResult
from migrator.exceptions import DatabaseAuthFailed, MigratorError
from migrator.redaction import redact
from migrator.runner import RunResult, elapsed_ms
from migrator.secrets import CredentialsUse, get_secrets_manager
from migrator.targets import Target
from migrator.verify import Verification

logger = logging.getLogger("migrator.pipeline")


# --- Values -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TargetRef:
    """Where one target's admin credentials are, as the control plane knows it: the target's
    ``name``, its ``provider``, the ``vault_path`` of its secret (relative to the secrets path),
    and the ``revision`` the record holds ("" base, None unknown): only a hint for the order of
    the reads of ``alembic_version``, what runs is decided by the database."""

    name: str
    provider: str
    vault_path: str
    revision: str | None = None


@dataclass(frozen=True)
class Intent:
    """What a run is to do: ``kind`` upgrade or downgrade, to ``revision`` ("head", a revision
    id, "expand@head" for a phase, "base", relative like "-1")."""

    kind: str = runner.UPGRADE
    revision: str = "head"


class Listener:
    """What the pipeline tells its caller while it runs, for what must be on record before the
    run ends (a worker may die). The default does nothing."""

    def credentials_issued(self, use: CredentialsUse) -> None:
        """A user that is not the secret's own pair was read for this run (dynamic, static
        role); ``use`` says where from, never a password."""

    def backup_taken(self, backup: Backup) -> None:
        """The backup before the run was taken; nothing was applied yet."""


@dataclass(frozen=True)
class Options:
    """How to run: ``backup`` the target first when something would change; ``verify`` its
    schema after an upgrade that applied something (VERIFY_AFTER_UPGRADE); ``run_id`` names the
    backup file; ``listener`` hears what must be recorded at once."""

    backup: bool = False
    verify: bool = False
    run_id: int = 0
    listener: Listener = Listener()


@dataclass
class Outcome:
    """What one run of the pipeline did to one target.

    ``result`` is the runner's ``RunResult`` (on failure: what it knew when it failed, if
    anything), ``error`` the failure (None: the run succeeded; a ``MigratorError``, an
    unexpected error wrapped as ``UnexpectedError``). ``backup`` the backup taken first, if
    any; ``credentials`` where the admin user came from (after the run: whether its lease was
    revoked); ``server`` the ``host:port`` the secret names ("" when none or never read);
    ``heads`` the script directory's heads the run ran against; ``duration_ms`` the whole run.
    """

    target: str
    result: RunResult | None = None
    error: MigratorError | None = None
    backup: Backup | None = None
    credentials: CredentialsUse | None = None
    server: str = ""
    heads: tuple[str, ...] = ()
    duration_ms: int = 0

    @property
    def succeeded(self) -> bool:
        return self.error is None

    @property
    def verification(self) -> Verification | None:
        return self.result.verification if self.result is not None else None


class UnexpectedError(MigratorError):
    """An error the engine has no name for, kept for the record (redacted)."""

    code = "internal_error"


# --- Credentials ------------------------------------------------------------------------------


@contextmanager
def admin_target(target: TargetRef, *, fresh: bool = True) -> Iterator[Target]:
    """``target``'s database as its admin user for the block, from
    ``GET /v1/{mount}/data/{secrets path}/{vault_path}`` (``fresh``: read from Vault now, not
    from the cache; a user Vault issues for the block is revoked when it ends)."""
    with get_secrets_manager().admin_credentials(
        target.vault_path, provider=target.provider, fresh=fresh
    ) as admin:
        yield Target(target.name, admin.connection)


def server_address(host: str | None, port: int | None) -> str:
    """``host:port`` of a database server ("" without a host: SQLite)."""
    if not host:
        return ""
    return f"{host}:{port or ''}".rstrip(":")


def server_of(target: TargetRef) -> str:
    """``host:port`` of the database server ``target``'s secret names
    (``SecretsManager.database_server``, cached read), or "" when it cannot be read or names no
    host (SQLite)."""
    try:
        host, port = get_secrets_manager().database_server(
            target.vault_path, provider=target.provider
        )
    except MigratorError:
        return ""
    return server_address(host, port)


def lock_held(target: TargetRef) -> bool:
    """Does a session hold the migration lock of ``target``'s database now
    (``migrator.locks.is_held``)? Reads the admin credentials from Vault (cached) to ask."""
    with admin_target(target, fresh=False) as database, engines.connect(database) as connection:
        return locks.is_held(connection)


# --- One run ----------------------------------------------------------------------------------


def run(target: TargetRef, intent: Intent, options: Options = Options()) -> Outcome:
    """Run ``intent`` on ``target``; returns the ``Outcome``, a failure included.

    Reads the admin credentials fresh from Vault (``SecretsManager.admin_credentials``): a run
    never decides what to do (nor "nothing to do") on a cached secret older than the one in
    Vault, which may now name another database. The secret says where the admin user comes
    from: its own pair, a static role, or a user Vault creates for this run and whose lease is
    revoked when the run ends, however it ends (``Outcome.credentials`` says whether it was).
    When the database rejects static credentials and Vault has newer ones (a rotation), reads
    Vault once more and tries once again. A downgrade whose revisions cannot be reverted is
    refused before anything runs. With ``options.backup``, backs up first when something would
    change (a failed backup stops the run before any DDL); with ``options.verify``, verifies
    the schema after an upgrade that applied something, on the run's own connection.

    Raises only what is not an ``Exception`` (the task timeout, ``SystemExit``,
    ``KeyboardInterrupt``), after the credentials were given back.
    """
    with runner.one_read():
        return _run(target, intent, options)


def _run(target: TargetRef, intent: Intent, options: Options) -> Outcome:
    started = time.monotonic()
    outcome = Outcome(target.name)
    secrets = get_secrets_manager()
    try:
        with secrets.admin_credentials(
            target.vault_path, provider=target.provider, fresh=True
        ) as admin:
            outcome.credentials = admin.use
            outcome.server = server_address(admin.connection.host, admin.connection.port)
            if admin.use.mode != "static":
                options.listener.credentials_issued(admin.use)
            outcome.result = _migrate_as(secrets, admin, target, intent, options, outcome)
    except MigratorError as exc:
        outcome.error = exc
        outcome.result = exc.result
    except Exception as exc:  # noqa: BLE001 - an outcome, never lost
        logger.exception("Unexpected error in the run for %s", target.name)
        outcome.error = UnexpectedError(
            f"Unexpected error ({type(exc).__name__}): {redact(str(exc))}"
        )
    finally:
        # After the block: a dynamic user's lease has been revoked (or not) by now.
        used = outcome.credentials
        if used is not None and used.mode != "static" and outcome.result is not None:
            outcome.result.log.append(used.summary())
    if outcome.error is not None:
        logger.error("%s", outcome.error)
    outcome.heads = (outcome.result.heads if outcome.result is not None else ()) or _heads_now()
    outcome.duration_ms = elapsed_ms(started)
    return outcome


def _heads_now() -> tuple[str, ...]:
    """The script directory's heads now, for a run that read none; () when it cannot be read
    (the run's error says why)."""
    try:
        return runner.heads()
    except MigratorError:
        return ()


def _migrate_as(secrets, admin, target: TargetRef, intent: Intent, options: Options, outcome):
    connection = admin.connection
    try:
        return _migrate(Target(target.name, connection), target, intent, options, outcome)
    except DatabaseAuthFailed:
        if admin.use.mode == "dynamic":
            raise  # a user made for this very run: reading another one would not help
        secrets.invalidate(target.vault_path)
        fresh = secrets.migration_credentials(target.vault_path, provider=target.provider)
        if fresh == connection:
            raise
        logger.info("Credentials for %s changed in Vault; retrying once", target.name)
        return _migrate(Target(target.name, fresh), target, intent, options, outcome)


def _migrate(
    database: Target, target: TargetRef, intent: Intent, options: Options, outcome: Outcome
) -> RunResult:
    kind, revision = intent.kind, intent.revision
    if kind == runner.DOWNGRADE:
        # A revision with an empty or raising downgrade() is refused before anything runs.
        current = runner.current(database).revision
        rollback.check_reversible(current, revision, target_name=database.name)
    if options.backup:
        backup = backups.backup_before_run(
            database, run_id=options.run_id, kind=kind, revision=revision
        )
        if backup is not None:
            outcome.backup = backup
            options.listener.backup_taken(backup)
    if kind == runner.DOWNGRADE:
        return runner.downgrade(database, revision)
    found = []

    def verify_on(connection, result):
        # On the run's connection, its target lock still held: no second login.
        found.append(
            verify.verify_after_upgrade(
                database,
                result.revision_after,
                vault_path=target.vault_path,
                provider=target.provider,
                connection=connection,
            )
        )

    result = runner.upgrade(
        database,
        revision,
        then=verify_on if options.verify else None,
        expect_pending=_recorded_behind(target, revision),
    )
    if found:
        result.verification = found[0]
        result.log.extend(found[0].log_lines())
    return result


def _recorded_behind(target: TargetRef, revision: str) -> bool:
    """Does the record say ``target`` is behind the heads (``revision`` being head)? Then the
    run takes the target lock before reading alembic_version: one read instead of two. Only a
    hint: the read under the lock decides."""
    if target.revision is None or revision not in ("head", "heads"):
        return False
    return not runner.up_to_date(runner.heads(), phases.applied(target.revision))


# --- Reading, restoring, verifying ------------------------------------------------------------


def read_revision(target: TargetRef) -> str | None:
    """The revision ``target``'s database stands at now, read from its ``alembic_version``
    (the secret read fresh from Vault: the database it names now)."""
    with admin_target(target) as database:
        return runner.current(database).revision


def restore(target: TargetRef, path: str, *, checksum: str = "") -> RestoreResult:
    """Put the backup at ``path`` back into ``target``'s database (``backups.restore``), with
    the admin credentials read fresh from Vault: a restore goes to the database the secret
    names now. Raises ``MigratorError`` (``RestoreFailed`` and friends) when it cannot."""
    with admin_target(target) as database:
        return backups.restore(database, path, checksum=checksum)


def verify_target(target: TargetRef, *, script_location=None) -> Verification:
    """Verify ``target``'s database as it stands now, without migrating: reads its admin and
    app credentials from Vault and its revision from ``alembic_version``. Never raises: a
    database that cannot be read is a ``Verification`` that says so."""
    try:
        with admin_target(target) as database:
            revision = runner.current(database, script_location=script_location).revision
            return verify.verify_target(
                database,
                revision=revision,
                app=verify.app_credentials(target.vault_path, target.provider),
                script_location=script_location,
            )
    except MigratorError as exc:
        return Verification(
            target.name,
            target.provider,
            target.revision or None,
            not_verified=f"the database could not be read: {exc}",
        )
    except Exception as exc:  # noqa: BLE001 - one target must not stop the fleet's check
        logger.exception("Verifying %s failed", target.name)
        return Verification(
            target.name,
            target.provider,
            target.revision or None,
            not_verified=f"unexpected error ({type(exc).__name__}): {redact(str(exc))}",
        )
