"""What a run ended with: the pipeline's outcome recorded in one transaction (success or
failure, with its backup, verification, credentials and server), the error kept within bounds.
"""

from django.db import transaction
from django.utils import timezone

from migrator.redaction import redact
from tenants.actions.backups import take_backup
from tenants.actions.credentials import take_credentials
from tenants.actions.retries import do_schedule_retry
from tenants.actions.saves import save_fields
from tenants.actions.statuses import save_status, target_status_for
from tenants.actions.verification import take_verification
from tenants.models import MigrationTarget, RunStatus, TargetStatus


def record_success(run, result, *, status, heads, changed, run_fields=(), target_fields=()):
    """Save a finished run's outcome, and where its target stands now (with ``run_fields`` and
    ``target_fields`` already set on them by the caller)."""
    now = timezone.now()
    run.status = status
    run.revision_before = result.revision_before or ""
    run.revision_after = result.revision_after or ""
    run.applied = list(getattr(result, "applied", []))
    run.duration_ms = result.duration_ms
    run.log = redact("\n".join(result.log))
    run.finished_at = now
    run.error = run.error_code = ""
    run.retryable = None
    run_fields = [
        *run_fields,
        "status",
        "revision_before",
        "revision_after",
        "applied",
        "duration_ms",
        "log",
        "finished_at",
        "error",
        "error_code",
        "retryable",
    ]
    target = run.target
    fields = [*target_fields, "revision", "status", "last_error", "last_checked_at"]
    verification = getattr(result, "verification", None)  # a restore's result has none
    if verification is not None:
        # The check of the schema after the upgrade, on the target and the run in the same saves.
        verified_fields, run.drift_report = take_verification(target, verification, now)
        fields += verified_fields
        run_fields.append("drift_report")
    save_fields(run, run_fields)
    target.revision = run.revision_after
    target.last_error = ""
    target.last_checked_at = now
    if changed:
        target.last_migrated_at = now
        fields.append("last_migrated_at")
    save_status(target, target_status_for(run.revision_after, heads), fields + ["updated_at"])
    return run


@transaction.atomic
def do_record_run_outcome(run, outcome):
    """Record what the pipeline returned for ``run`` (a ``migrator.pipeline.Outcome``), in one
    transaction: success (``succeeded``, or ``skipped`` when nothing was applied) or failure on
    the run and its target, with the backup taken, the schema verification, where the admin
    user came from (and whether its lease was revoked) and the server the secret named; after a
    retryable failure, the next attempt (``do_schedule_retry``). Returns the run."""
    run_fields, target_fields = [], []
    if outcome.backup is not None:
        run_fields += take_backup(run, outcome.backup)
    if outcome.credentials is not None and outcome.credentials.mode != "static":
        run_fields += take_credentials(run, outcome.credentials)
    if outcome.server and run.target.server != outcome.server:
        run.target.server = outcome.server
        target_fields.append("server")
    if outcome.error is None:
        result = outcome.result
        record_success(
            run,
            result,
            status=RunStatus.SUCCEEDED if result.applied else RunStatus.SKIPPED,
            heads=outcome.heads,
            changed=bool(result.applied),
            run_fields=run_fields,
            target_fields=target_fields,
        )
        return run
    _record_failure(
        run,
        outcome.error,
        heads=outcome.heads,
        result=outcome.result,
        duration_ms=outcome.duration_ms,
        run_fields=run_fields,
        target_fields=target_fields,
    )
    if outcome.error.retryable:
        do_schedule_retry(run)
    return run


@transaction.atomic
def do_record_run_failure(run, error, *, heads, result=None, duration_ms=None):
    """Record a failed run: the error (never a secret), the log, and where the target stands.

    ``error`` is a ``MigratorError`` (its ``code`` and ``retryable`` are recorded) or any other
    exception, recorded as an internal error. ``result`` is what the runner knew when it failed.
    """
    return _record_failure(run, error, heads=heads, result=result, duration_ms=duration_ms)


def _record_failure(run, error, *, heads, result, duration_ms, run_fields=(), target_fields=()):
    """Save a failed run, and where its target stands (with ``run_fields`` and
    ``target_fields`` already set on them by the caller)."""
    now = timezone.now()
    result = result if result is not None else getattr(error, "result", None)
    message = bounded_error(redact(str(error)) or type(error).__name__)
    run.status = RunStatus.FAILED
    run.error = message
    run.error_code = getattr(error, "code", "internal_error")
    run.retryable = bool(getattr(error, "retryable", False))
    run.finished_at = now
    fields = [*run_fields, "status", "error", "error_code", "retryable", "finished_at"]
    if result is not None:
        run.revision_before = result.revision_before or ""
        run.revision_after = result.revision_after or ""
        run.applied = list(result.applied)
        run.duration_ms = result.duration_ms
        run.log = redact("\n".join(result.log))
        fields += ["revision_before", "revision_after", "applied", "duration_ms", "log"]
    elif duration_ms is not None:
        run.duration_ms = duration_ms
        fields.append("duration_ms")
    save_fields(run, fields)

    target = run.target
    target.last_error = message
    target.last_checked_at = now
    fields = [*target_fields, "status", "last_error", "last_checked_at", "updated_at"]
    if result is not None and result.revision_after is not None:
        target.revision = result.revision_after
        fields.append("revision")
    if run.error_code in ("locked", "lock_timeout"):
        # Somebody else is migrating it, or holds a table: the schema did not fail, it is busy.
        status = target_status_for(target.revision, heads)
    else:
        status = TargetStatus.FAILED
    if result is not None and result.applied:
        target.last_migrated_at = now
        fields.append("last_migrated_at")
    save_status(target, status, fields)
    return run


# The most of an error a run and its target keep: the whole message of a driver or a revision
# (PostgreSQL's DETAIL, the rows a revision lists), not a runaway one.
ERROR_LIMIT = 8192


def bounded_error(message):
    """``message`` whole up to ``ERROR_LIMIT`` characters; beyond, cut, saying how much was."""
    if len(message) <= ERROR_LIMIT:
        return message
    cut = f"\n… ({len(message) - ERROR_LIMIT} more characters in the worker's log)"
    return message[: ERROR_LIMIT - len(cut)] + cut


def do_record_server(target, server):
    """Record ``server`` (``host:port`` read from the target's secret) on ``target`` when it
    changed: the per-server cap of rollouts counts by it."""
    if target.server != server:
        MigrationTarget.objects.filter(pk=target.pk).update(server=server)
        target.server = server
