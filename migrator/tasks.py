"""django-q2 task entry points, and the bridge between the record and the engine.

This is the only module of ``migrator`` that imports ``tenants``: a task reloads its run
through the ``tenants`` actions, builds the plain values the engine takes (``pipeline.TargetRef``
from the target's record), calls the engine (``migrator.pipeline``), and records what it returned
with one action (``tenants.actions.do_record_run_outcome``, one transaction). Restores
(``restore_run``) and the fleet's drift check (``check_fleet_for_drift``, a django-q2 schedule)
are tasks here too. A task runs in a django-q2 worker process (or inline for
``migrate_tenants --sync``); Alembic is process-global, so each worker process runs one
migration at a time.
"""

import logging
import threading
import time
from contextlib import contextmanager

from django import db
from django.conf import settings
from django.db import connections

from migrator import backups, pipeline, process, providers, runner
from migrator.exceptions import MigratorError, RestoreFailed
from migrator.pipeline import Intent, Options, TargetRef
from migrator.redaction import redact
from migrator.verify import Verification
from tenants import actions

logger = logging.getLogger("migrator.tasks")


def target_ref(record, *, with_revision=False):
    """The engine's ``TargetRef`` for ``record`` (a ``MigrationTarget``); ``with_revision``
    passes the revision the record holds as the run's hint."""
    return TargetRef(
        record.name,
        record.provider,
        record.effective_vault_path,
        revision=(record.revision or "") if with_revision else None,
    )


def run_migration(run_id):
    """Execute run ``run_id``; returns a small summary for django-q2's result table.

    Returns early when the run is no longer queued (cancelled, or already taken by another
    worker). Never raises for a migration that failed: the failure is recorded on the run, and
    the task itself succeeded in doing its job. A retryable failure (Vault or the database
    unreachable, the target locked) queues the next attempt after a back-off, in the same
    transaction as the outcome. The summary never contains a secret.
    """
    # The run and its record (the target's status against the heads) from one look at the
    # script directory on disk.
    with runner.one_read():
        return _run_migration(run_id)


def _run_migration(run_id):
    run = actions.do_start_run(run_id, worker_host=actions.worker_identity())
    if run is None:
        logger.info("Run %s is no longer queued; nothing to do", run_id)
        return {"run": run_id, "status": "not-queued"}
    record = run.target
    started = time.monotonic()
    options = Options(
        backup=backups.required(record.backup_policy, record.kind),
        verify=settings.VERIFY_AFTER_UPGRADE,
        run_id=run.pk,
        listener=_Recorder(run),
    )
    try:
        with heartbeat(run.pk):
            outcome = pipeline.run(
                target_ref(record, with_revision=True),
                Intent(run.kind, run.requested_revision),
                options,
            )
    except BaseException as exc:
        # The task timeout (django-q2 raises it in the worker), sys.exit(), KeyboardInterrupt:
        # the run says what stopped it, then the worker ends as it would have.
        _record_abort(run, exc, started, credentials=options.listener.issued)
        raise
    _until_recorded(run, actions.do_record_run_outcome, run, outcome)
    _advance_rollout(run)
    return {"run": run_id, "target": record.name, "status": run.status}


class _Recorder(pipeline.Listener):
    """Records at once what the pipeline says must be on record before the run ends: the user
    Vault made for it (a worker that dies shows the lease it left), the backup taken."""

    def __init__(self, run):
        self.run = run
        self.issued = None  # the CredentialsUse told, its revocation is set on it later

    def credentials_issued(self, use):
        self.issued = use
        try:
            _until_recorded(self.run, actions.do_record_admin_credentials, self.run, use)
        except Exception:  # noqa: BLE001 - the run's outcome matters more; its log says it
            logger.exception("Could not record the admin credentials of run %s", self.run.pk)

    def backup_taken(self, backup):
        actions.do_record_backup(self.run, backup)


def migrate(record, *, kind="upgrade", revision="head"):
    """Bring the database of ``record`` (a ``MigrationTarget``) to ``revision`` without a run
    (nothing recorded but the server its secret names); returns the ``RunResult``, raises the
    ``MigratorError`` of a failure."""
    outcome = pipeline.run(target_ref(record), Intent(kind, revision))
    if outcome.server:
        actions.do_record_server(record, outcome.server)
    if outcome.error is not None:
        raise outcome.error
    return outcome.result


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


class _Aborted(MigratorError):
    code = "aborted"


def _record_abort(run, exc, started, *, credentials=None):
    """Record on ``run`` what ended it without an outcome (``BaseException`` that is not an
    ``Exception``), where the target stands, read back from its database, and whether the user
    Vault made for the run (``credentials``) was revoked."""
    from django_q.exceptions import TimeoutException

    if credentials is not None:
        _Recorder(run).credentials_issued(credentials)

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
            duration_ms=runner.elapsed_ms(started),
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
            duration_ms=runner.elapsed_ms(started),
        )
    except Exception:  # noqa: BLE001 - recovery closes the run instead
        logger.exception("Could not record how run %s ended", run.pk)


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

    def after_fork(self):
        """In a forked child: the object came along, the thread did not, and the condition's
        lock may have been held by the parent's thread; the parent's runs are not the child's."""
        self._changed = threading.Condition()
        self._due = {}
        self._thread = None

    def add(self, run_id):
        with self._changed:
            self._due[run_id] = time.monotonic() + settings.RUN_HEARTBEAT_SECONDS
            if self._thread is None or not self._thread.is_alive():
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
        try:
            for run_id in run_ids:
                actions.do_heartbeat(run_id)
        except Exception:  # noqa: BLE001 - a missed heartbeat must not kill the migration
            logger.warning("Heartbeat of run(s) %s failed", run_ids, exc_info=True)
        finally:
            connections.close_all()  # this thread's own connection; beats are far apart


_heartbeats = _Heartbeats()
process.register("tasks.heartbeats", after_fork=_heartbeats.after_fork)


def server_of(record):
    """``host:port`` of the database server ``record``'s secret names (cached read), or "" when
    it cannot be read or names no host (SQLite)."""
    return pipeline.server_of(target_ref(record))


def read_revision(record):
    """The revision the database of ``record`` stands at now, read from its ``alembic_version``
    (the secret read fresh from Vault: the database it names now)."""
    return pipeline.read_revision(target_ref(record))


def target_lock_held(record):
    """Does a session hold the migration lock of ``record``'s database now? Reads the admin
    credentials from Vault (cached) to ask."""
    return pipeline.lock_held(target_ref(record))


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


# --- Restores ---------------------------------------------------------------------------------


def restore_run(run, *, backup_run):
    """Execute the restore ``run`` (kind "restore", running): put the backup taken before
    ``backup_run`` back into the target (``pipeline.restore``, the admin credentials read fresh
    from Vault), and record the outcome through ``tenants.actions``. Returns the run as
    recorded; a failed restore is recorded on the run (``restore_failed`` and friends), never
    raised. Writes heartbeats while it works, so the recovery schedule can tell a live restore
    from a dead one.
    """
    record = run.target
    started = time.monotonic()
    try:
        with heartbeat(run.pk):
            result = pipeline.restore(
                target_ref(record), backup_run.backup_path, checksum=backup_run.backup_checksum
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
        run, error, heads=runner.heads(), duration_ms=runner.elapsed_ms(started)
    )


# --- The fleet's drift check ------------------------------------------------------------------


def verify_records(records, *, trigger, acting_user=None, record_every_run=False):
    """Verify each of ``records`` as it stands (``pipeline.verify_target``) and record what was
    found (``do_record_verification``).

    A target with a queued or running migration is left out (its schema is changing), and so
    is one whose database could not be read: its record is kept as it was. Returns one
    ``Verification`` per target, in order.
    """
    from tenants.models import ACTIVE_RUN_STATUSES

    results = []
    for record in records:
        if record.runs.filter(status__in=ACTIVE_RUN_STATUSES).exists():
            results.append(
                Verification(
                    record.name,
                    record.provider,
                    record.revision or None,
                    not_verified="skipped: a migration is queued or running",
                )
            )
            continue
        verification = pipeline.verify_target(target_ref(record, with_revision=True))
        results.append(verification)
        if verification.fingerprint:
            actions.do_record_verification(
                record,
                verification,
                trigger=trigger,
                acting_user=acting_user,
                record_run=record_every_run,
            )
        else:
            logger.warning("%s: %s", record.name, verification.not_verified)
    return results


def check_fleet_for_drift():
    """Re-check every target for drift, without migrating (the django-q2 schedule "tenants:
    re-check the fleet for drift", every VERIFY_SCHEDULE_MINUTES). Returns one line per target
    that drifted, has grant problems or could not be verified, and a count line."""
    from tenants.models import MigrationTarget, Trigger

    results = verify_records(MigrationTarget.objects.all(), trigger=Trigger.SCHEDULE)
    lines = []
    for verification in results:
        if verification.drifted:
            lines.append(f"{verification.target}: drifted: " + "; ".join(verification.differences))
        elif not verification.verified:
            lines.append(f"{verification.target}: not verified: {verification.not_verified}")
        lines += [f"{verification.target}: {line}" for line in verification.grant_problems]
    drifted = sum(v.drifted for v in results)
    lines.append(f"{len(results)} target(s) checked, {drifted} drifted")
    logger.info("%s", lines[-1])
    return lines
