"""django-q2 task entry points: one task migrates one target for one run.

The task is the only place where the record meets the engine: it takes the run through the
``tenants`` actions, reads the admin credentials from Vault, calls the runner and records the
outcome. It runs in a django-q2 worker process (or inline for ``migrate_tenants --sync``); Alembic
is process-global, so each worker process runs one migration at a time.
"""

import logging
import os
import threading
import time
from contextlib import contextmanager

from django import db
from django.conf import settings
from django.db import connections

from migrator import providers, runner
from migrator.exceptions import DatabaseAuthFailed, MigratorError
from migrator.redaction import redact
from migrator.secrets import get_secrets_manager
from migrator.targets import Target

logger = logging.getLogger("migrator.tasks")


def run_migration(run_id):
    """Execute run ``run_id``; returns a small summary for django-q2's result table.

    Returns early when the run is no longer queued (cancelled, or already taken by another
    worker). Never raises for a migration that failed: the failure is recorded on the run, and
    the task itself succeeded in doing its job. A retryable failure (Vault or the database
    unreachable, the target locked) queues the next attempt after a back-off. The summary never
    contains a secret.
    """
    from tenants import actions

    run = actions.do_start_run(run_id, worker_host=actions.worker_identity())
    if run is None:
        logger.info("Run %s is no longer queued; nothing to do", run_id)
        return {"run": run_id, "status": "not-queued"}
    started = time.monotonic()
    error = None
    try:
        with heartbeat(run.pk):
            result = migrate(run.target, kind=run.kind, revision=run.requested_revision, run=run)
    except MigratorError as exc:
        error = exc
    except Exception as exc:  # noqa: BLE001 - recorded on the run, never lost
        logger.exception("Unexpected error in run %s for %s", run_id, run.target.name)
        error = _UnexpectedError(f"Unexpected error ({type(exc).__name__}): {redact(str(exc))}")
    except BaseException as exc:
        # The task timeout (django-q2 raises it in the worker), sys.exit(), KeyboardInterrupt:
        # the run says what stopped it, then the worker ends as it would have.
        _record_abort(run, exc, started)
        raise
    if error is None:
        _until_recorded(run, actions.do_record_run_success, run, result, heads=_heads_of(result))
    else:
        logger.error("%s", error)
        _until_recorded(
            run,
            actions.do_record_run_failure,
            run,
            error,
            heads=_heads_of(getattr(error, "result", None)),
            duration_ms=_elapsed_ms(started),
        )
        if error.retryable:
            _until_recorded(run, actions.do_schedule_retry, run)
    _advance_rollout(run)
    return {"run": run_id, "target": run.target.name, "status": run.status}


def _until_recorded(run, action, *args, **kwargs):
    """Call the recording ``action``, again while the control-plane database cannot be reached
    (down, restarting, locked), for up to ``RUN_RECORD_RETRY_SECONDS``: by then the target
    database has committed what the run did, and only this worker knows it. After that the
    error propagates; the run stays running without heartbeats, and the recovery of stale runs
    reads where the database stands and records it (``recover_stale_runs``)."""
    deadline = time.monotonic() + settings.RUN_RECORD_RETRY_SECONDS
    pause = 0.5
    while True:
        try:
            return action(*args, **kwargs)
        except (db.OperationalError, db.InterfaceError) as exc:
            connections.close_all()  # the next attempt opens a new connection
            left = deadline - time.monotonic()
            if left <= 0:
                logger.error(
                    "Could not record the outcome of run %s for %s in the control-plane "
                    "database: %s. Gave up after RUN_RECORD_RETRY_SECONDS; the recovery of "
                    "stale runs will read where the database stands and record it.",
                    run.pk,
                    run.target.name,
                    exc,
                )
                raise
            logger.warning(
                "Could not record the outcome of run %s for %s (%s); trying again",
                run.pk,
                run.target.name,
                exc,
            )
            time.sleep(min(pause, left))
            pause = min(pause * 2, 10)


def _advance_rollout(run):
    """Step the run's rollout on (``tenants.rollouts.advance_after_run``; nothing for a run of
    no rollout). A failure here is the recovery loop's to retry: the run is recorded."""
    if run.rollout_id is None:
        return
    from tenants import rollouts

    try:
        rollouts.advance_after_run(run)
    except Exception:  # noqa: BLE001 - the qcluster's loop steps it again
        logger.exception("Could not advance rollout %s after run %s", run.rollout_id, run.pk)


class _UnexpectedError(MigratorError):
    code = "internal_error"


class _Aborted(MigratorError):
    code = "aborted"


def _record_abort(run, exc, started):
    """Record on ``run`` what ended it without an outcome (``BaseException`` that is not an
    ``Exception``), and where the target stands, read back from its database."""
    from django_q.exceptions import TimeoutException

    from tenants import actions

    if isinstance(exc, TimeoutException):
        what = (
            f"Stopped by the task timeout: the run took longer than MIGRATION_TASK_TIMEOUT "
            f"({settings.MIGRATION_TASK_TIMEOUT} s), so the worker ended it. Raise "
            "MIGRATION_TASK_TIMEOUT, or make the revision faster."
        )
    elif isinstance(exc, KeyboardInterrupt):
        what = (
            "Interrupted (KeyboardInterrupt): SIGINT reached the worker process, or a revision "
            "raised it."
        )
    elif isinstance(exc, SystemExit):
        what = f"A revision (or a library it calls) called sys.exit({exc.code!r})."
    else:
        what = f"Ended by {type(exc).__name__}: {redact(str(exc))}"
    result = None
    try:
        revision = read_revision(run.target)
        where = f" The target stands at {revision or 'base (empty)'}."
        result = runner.RunResult(
            run.target.name,
            run.kind,
            revision_before=run.revision_before or None,
            revision_after=revision,
            duration_ms=_elapsed_ms(started),
        )
    except Exception as read_error:  # noqa: BLE001 - the record matters more than the read
        where = f" Its revision could not be read back: {read_error}"
    provider = providers.get(run.target.provider)
    rolled_back = (
        f" {provider.partial_ddl}: the revision that was running may be partly applied."
        if not provider.transactional_ddl
        else " The revision that was running was rolled back."
    )
    try:
        actions.do_record_run_failure(
            run,
            _Aborted(what + rolled_back + where),
            heads=runner.heads(),
            result=result,
            duration_ms=_elapsed_ms(started),
        )
    except Exception:  # noqa: BLE001 - recovery closes the run instead
        logger.exception("Could not record how run %s ended", run.pk)


def _heads_of(result):
    """The heads the run ran against; the script directory's heads now when it ran none."""
    return getattr(result, "heads", None) or runner.heads()


def _elapsed_ms(started):
    return int((time.monotonic() - started) * 1000)


@contextmanager
def heartbeat(run_id):
    """Write the run's heartbeat every ``RUN_HEARTBEAT_SECONDS`` while the block runs.

    The beats come from one thread per process (``_Heartbeats``), with its own control-plane
    connection; the migration itself stays on this thread (Alembic is not thread-safe, the
    heartbeat touches nothing of it). Starting a thread per run cost each run a wait for the new
    thread to be scheduled, which on a busy worker host was milliseconds (bench/README.md).
    """
    _heartbeats.add(run_id)
    try:
        yield
    finally:
        _heartbeats.remove(run_id)


class _Heartbeats:
    """The runs in progress in this process, and the thread that beats for them."""

    def __init__(self):
        self._changed = threading.Condition()
        self._due = {}  # run id -> time.monotonic() of its next beat
        self._thread = None
        self._pid = None

    def add(self, run_id):
        with self._changed:
            self._due[run_id] = time.monotonic() + settings.RUN_HEARTBEAT_SECONDS
            # A forked worker inherits the object but not the thread.
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
                self._thread.start()
            self._changed.notify()

    def remove(self, run_id):
        with self._changed:
            self._due.pop(run_id, None)

    def _run(self):
        while True:
            with self._changed:
                due = self._wait_for_due()
                for run_id in due:
                    self._due[run_id] = time.monotonic() + settings.RUN_HEARTBEAT_SECONDS
            self._beat(due)

    def _wait_for_due(self):
        while True:
            now = time.monotonic()
            due = [run_id for run_id, at in self._due.items() if at <= now]
            if due:
                return due
            self._changed.wait(min(self._due.values()) - now if self._due else None)

    @staticmethod
    def _beat(run_ids):
        from tenants import actions

        try:
            for run_id in run_ids:
                actions.do_heartbeat(run_id)
        except Exception:  # noqa: BLE001 - a missed heartbeat must not kill the migration
            logger.warning("Heartbeat of run(s) %s failed", run_ids, exc_info=True)
        finally:
            connections.close_all()  # this thread's own connection; beats are far apart


_heartbeats = _Heartbeats()


def migrate(record, *, kind="upgrade", revision="head", run=None):
    """Bring the database of ``record`` (a ``MigrationTarget``) to ``revision``.

    Reads the admin credentials at ``{mount}/data/{secrets path}/{path}``, ``path`` being
    ``record.effective_vault_path``, fresh from Vault: a run never decides what to do (nor
    "nothing to do") on a cached secret older than the one in Vault, which may now name
    another database. The secret says where the admin user comes from
    (``migrator.secrets.SecretsManager.admin_credentials``): its own pair, a static role, or a
    user Vault creates for this run and whose lease is revoked when the run ends, however it
    ends; with ``run``, that is recorded on the run when the user is issued and again after the
    revocation, and said in its log. When the database rejects static credentials and Vault has
    newer ones (a rotation), reads Vault once more and retries once. With ``run``, also does
    what a recorded run does around the migration: a backup first when the target's
    policy asks for one and something is pending (a failed backup stops the run before any
    DDL), and a verification of the schema after an upgrade; both are recorded on the run.
    """
    secrets = get_secrets_manager()
    used = None
    outcome = None
    try:
        with secrets.admin_credentials(
            record.effective_vault_path, provider=record.provider, fresh=True
        ) as admin:
            used = admin.use
            _record_server(record, admin.connection)
            if run is not None and used.mode != "static":
                _record_credentials(run, used)
            outcome = _migrate_as(secrets, admin, record, kind, revision, run)
            return outcome
    except MigratorError as exc:
        outcome = exc.result
        raise
    finally:
        if used is not None:
            _say_credentials(used, outcome, run)


def _migrate_as(secrets, admin, record, kind, revision, run):
    connection = admin.connection
    try:
        return _migrate(Target(record.name, connection), record, kind, revision, run)
    except DatabaseAuthFailed:
        if admin.use.mode == "dynamic":
            raise  # a user made for this very run: reading another one would not help
        secrets.invalidate(record.effective_vault_path)
        fresh = secrets.migration_credentials(record.effective_vault_path, provider=record.provider)
        if fresh == connection:
            raise
        logger.info("Credentials for %s changed in Vault; retrying once", record.name)
        return _migrate(Target(record.name, fresh), record, kind, revision, run)


def _say_credentials(used, outcome, run):
    """Put where the admin user came from (and, for a dynamic one, whether its lease was
    revoked) in the run's log and record; a failed revocation is an error in the worker's log
    too (``SecretsManager._revoke``)."""
    if used.mode == "static":
        return
    if outcome is not None:
        outcome.log.append(used.summary())
    if run is not None:
        _record_credentials(run, used)


def _record_credentials(run, used):
    from tenants import actions

    try:
        _until_recorded(run, actions.do_record_admin_credentials, run, used)
    except Exception:  # noqa: BLE001 - the run's outcome matters more; its log says it
        logger.exception("Could not record the admin credentials of run %s", run.pk)


def _migrate(target, record, kind, revision, run):
    from migrator import backups, rollback, verify

    if kind == "downgrade":
        # A revision with an empty or raising downgrade() is refused before anything runs.
        current = runner.current(target).revision
        rollback.check_reversible(current, revision, target_name=target.name)
    if run is not None and backups.required(record):
        backups.backup_before_run(target, record, run, kind=kind, revision=revision)
    if kind == "downgrade":
        return runner.downgrade(target, revision)
    if run is None:
        return runner.upgrade(target, revision)

    def verify_on(connection, result):
        verify.verify_after_upgrade(target, record, run, result, connection=connection)

    return runner.upgrade(
        target, revision, then=verify_on, expect_pending=_recorded_behind(record, revision)
    )


def _recorded_behind(record, revision):
    """Does the control plane's record say ``record`` is behind the heads (``revision`` being
    head)? Then its run takes the target lock before reading alembic_version: one read instead
    of two. Only a hint: the read under the lock decides."""
    from tenants.actions import target_status_for
    from tenants.models import TargetStatus

    if revision not in ("head", "heads"):
        return False
    return target_status_for(record.revision, runner.heads()) != TargetStatus.UP_TO_DATE


def _record_server(record, connection):
    """Note on the record which server the secret names (rollouts cap runs per server)."""
    from tenants.actions import do_record_server

    if connection.host:
        try:
            do_record_server(record, f"{connection.host}:{connection.port or ''}".rstrip(":"))
        except Exception:  # noqa: BLE001 - a note for scheduling; the run goes on
            logger.warning("Could not record the server of %s", record.name, exc_info=True)


def server_of(record):
    """``host:port`` of the database server ``record``'s secret names (cached read), or "" when
    it cannot be read or names no host (SQLite)."""
    try:
        host, port = get_secrets_manager().database_server(
            record.effective_vault_path, provider=record.provider
        )
    except MigratorError:
        return ""
    if not host:
        return ""
    return f"{host}:{port or ''}".rstrip(":")


def read_revision(record):
    """The revision the database of ``record`` stands at now, read from its ``alembic_version``
    (the secret read fresh from Vault: the database it names now)."""
    with get_secrets_manager().admin_credentials(
        record.effective_vault_path, provider=record.provider, fresh=True
    ) as admin:
        return runner.current(Target(record.name, admin.connection)).revision


def target_lock_held(record):
    """Does a session hold the migration lock of ``record``'s database now
    (``migrator.locks.is_held``)? Reads the admin credentials from Vault (cached) to ask."""
    from migrator import engines, locks

    with (
        get_secrets_manager().admin_credentials(
            record.effective_vault_path, provider=record.provider
        ) as admin,
        engines.connect(Target(record.name, admin.connection)) as db,
    ):
        return locks.is_held(db)


def recover_stale_runs(*, regions=None):
    """Close every run whose worker stopped sending heartbeats, and release its target.

    A silent run whose target's migration lock is still held is left running: the session that
    holds it is alive, so the run is too (its heartbeat thread was starved, e.g. by a revision
    that holds the GIL); it is closed once the lock is free.

    Run every minute by each ``qcluster``'s main process for the regions it serves (``regions``;
    None: all), outside the queue so that long migrations cannot delay it, and on demand by
    ``migrate_tenants --recover``. For each, reads the target's real revision back from its
    ``alembic_version``. Returns one line per recovered run.
    """
    from tenants import actions

    lines = []
    for run in actions.stale_runs(regions=regions).select_related("target"):
        try:
            if target_lock_held(run.target):
                # A silent run whose session still holds the lock is alive: a revision that
                # holds the GIL starves the heartbeat thread, not the database session.
                lines.append(
                    f"Run #{run.pk} for {run.target.name}: no heartbeat since "
                    f"{run.heartbeat_at:%H:%M:%S} UTC, but the target's migration lock is still "
                    "held (by this run, or another migration of that database); left running"
                )
                continue
        except MigratorError:
            pass  # the database cannot be asked: judged by the heartbeat alone, as before
        try:
            revision, problem = read_revision(run.target), ""
        except MigratorError as exc:
            revision, problem = None, str(exc)
        done = None if problem else _steps_done(run, revision)
        name = run.target.name
        if done is not None and done.complete:
            # Its worker stopped after the work (killed after the last commit, or the control
            # plane was unreachable when it recorded): record what the database shows happened.
            if actions.do_record_recovered_run(
                run,
                revision_before=run.target.revision,
                revision=revision,
                applied=done.done,
                heads=runner.heads(),
            ):
                lines.append(
                    f"Run #{run.pk} for {name}: its worker stopped before recording it; the "
                    f"database stands at {revision or 'base'}, so it is recorded as completed "
                    f"({len(done.done)} revision(s) applied)"
                )
            continue
        if actions.do_mark_run_interrupted(
            run,
            revision=revision,
            revision_error=problem,
            revision_before=None if done is None else run.target.revision,
            applied=done.done if done is not None else (),
        ):
            where = problem or f"now at {revision or 'base'}"
            lines.append(f"Run #{run.pk} for {name} interrupted; {where}")
    return lines + recover_abandoned_runs(regions=regions)


def recover_abandoned_runs(*, regions=None):
    """Close the queued runs that no worker took (``tenants.actions.abandoned_runs``) as failed,
    each saying why it probably waited in vain, and queue the next attempt while attempts remain
    (``RUN_MAX_ATTEMPTS``): a message the broker lost is sent again. The old message, if a
    worker ever reads it, does nothing (the run is not queued any more). Returns one line per
    run."""
    from tenants import actions

    lines = []
    for run in actions.abandoned_runs(regions=regions):
        if not actions.do_mark_run_abandoned(run):
            continue
        retry = actions.do_schedule_retry(run, at_once=True)
        then = f"attempt {retry.attempt} queued as run #{retry.pk}" if retry else "no retry left"
        lines.append(
            f"Run #{run.pk} for {run.target.name} abandoned in the queue ({then}): {run.error}"
        )
    return lines


def _steps_done(run, revision):
    """How much of ``run``'s plan (from the revision its target's record held, which the lost
    run never updated, to its requested revision) the database at ``revision`` shows done; None
    when that cannot be told (a restore, a revision the script directory does not know)."""
    if run.kind not in ("upgrade", "downgrade"):
        return None
    try:
        return runner.steps_done(
            run.kind, run.target.revision, run.requested_revision, revision or None
        )
    except MigratorError:
        return None
