"""Runs that no worker finishes: queued runs abandoned in a queue that stopped moving, running
runs whose heartbeat stopped (closed interrupted), and runs a dead worker completed (recorded
from what their database shows).
"""

import logging

from django.db import models, transaction
from django.utils import timezone

from migrator import providers
from tenants import routing
from tenants.actions.statuses import save_status, target_status_for
from tenants.models import MigrationRun, MigrationTarget, RunStatus, TargetStatus

logger = logging.getLogger(__name__)


def abandoned_runs(*, now=None, regions=None):
    """Queued runs that no worker took within ``RUN_QUEUED_TIMEOUT_SECONDS`` while their queue
    made no progress (no run of that cluster running, none started in that time).

    A long queue that moves is not abandoned: a fleet of a thousand behind two workers waits
    its turn. A message the broker lost (Redis restarted without persistence, a cluster killed
    holding it), a queue no worker serves, a task no worker could read (another SECRET_KEY), a
    run created by a ``--sync`` process that was killed: each leaves a run queued in a queue
    that stops moving, and is found once it has been still this long.
    """
    from datetime import timedelta

    from django.conf import settings

    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.RUN_QUEUED_TIMEOUT_SECONDS)
    waiting = (
        MigrationRun.objects.filter(status=RunStatus.QUEUED)
        .filter(
            models.Q(not_before__isnull=True, created_at__lt=cutoff)
            | models.Q(not_before__lt=cutoff)
        )
        .select_related("target")
    )
    if regions is not None:
        waiting = waiting.filter(target__region__in=regions)
    if not settings.REGION_CLUSTERS and _queue_moving(None, cutoff):
        return []  # one queue, and it moves: nothing to read
    moving, found = {}, []
    for run in waiting:
        cluster = routing.cluster_for(run.target.region)
        if cluster not in moving:
            moving[cluster] = _queue_moving(cluster, cutoff)
        if not moving[cluster]:
            found.append(run)
    return found


def _queue_moving(cluster, cutoff):
    """Is a run of ``cluster``'s regions running, or was one started since ``cutoff``?"""
    from django.conf import settings

    runs = MigrationRun.objects.filter(
        models.Q(status=RunStatus.RUNNING) | models.Q(started_at__gte=cutoff)
    )
    if settings.REGION_CLUSTERS:
        regions = [r for r, c in settings.REGION_CLUSTERS.items() if c == cluster]
        runs = runs.filter(target__region__in=regions)
    return runs.exists()


def abandoned_reason(run):
    """Why ``run`` probably waited in vain, and what to check, for its error."""
    from django.conf import settings

    waited = settings.RUN_QUEUED_TIMEOUT_SECONDS
    queue = routing.cluster_for(run.target.region) or routing.current_cluster() or "default"
    if not run.task_id and run.not_before is None:
        return (
            f"Abandoned: run #{run.pk} for {run.target.name} was created to run in the process "
            f"that created it (`migrate_tenants --sync`, `startup_migrations`), which stopped "
            f"before it ran it (killed?), and no worker takes such a run; nothing ran."
        )
    if not run.task_id:
        where = (
            f"the retry was to be handed to the queue by the schedule 'retry-run-{run.pk}', and "
            f"no worker took it within {waited}s (RUN_QUEUED_TIMEOUT_SECONDS) after it was due: "
            f"is a `qcluster` running for queue {queue!r}?"
        )
    else:
        where = f"no worker took it within {waited}s (RUN_QUEUED_TIMEOUT_SECONDS)"
    return (
        f"Abandoned in the queue: {where}, while that queue made no progress; nothing ran. "
        f"Likely causes: no `qcluster` serves queue {queue!r} (start one with the web "
        "process's DATABASE_URL and REDIS_URL, and Q_CLUSTER_NAME for a region's queue); the "
        "broker lost the message (Redis restarted without persistence, or a cluster was killed "
        "while holding it); or the worker could not read the task (every web process and "
        "worker must share SECRET_KEY and Q_SITE_NAME; the worker's log then says "
        "BadSignature)."
    )


@transaction.atomic
def do_mark_run_abandoned(run):
    """Close a queued run that no worker took (``abandoned_runs``) as failed, saying why it
    probably waited in vain, and mark its target failed (nothing ran on it). False when a
    worker took it meanwhile. The caller queues the next attempt."""
    message = abandoned_reason(run)
    now = timezone.now()
    updated = MigrationRun.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(
        status=RunStatus.FAILED,
        finished_at=now,
        error_code="abandoned",
        retryable=True,
        error=message,
    )
    if not updated:
        return False
    run.status, run.error, run.error_code, run.retryable = (
        RunStatus.FAILED,
        message,
        "abandoned",
        True,
    )
    target = MigrationTarget.objects.select_for_update().get(pk=run.target_id)
    target.last_error = f"Run #{run.pk} was abandoned in the queue; nothing ran."
    target.last_checked_at = now
    save_status(
        target, TargetStatus.FAILED, ["status", "last_error", "last_checked_at", "updated_at"]
    )
    logger.warning("Run %s for %s was abandoned in the queue", run.pk, target.name)
    return True


def stale_runs(*, now=None, regions=None):
    """Running runs whose heartbeat stopped longer than ``RUN_STALE_AFTER_SECONDS`` ago."""
    from datetime import timedelta

    from django.conf import settings

    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.RUN_STALE_AFTER_SECONDS)
    runs = MigrationRun.objects.filter(status=RunStatus.RUNNING, heartbeat_at__lt=cutoff)
    return runs if regions is None else runs.filter(target__region__in=regions)


@transaction.atomic
def do_mark_run_interrupted(run, *, revision, revision_error="", revision_before=None, applied=()):
    """Close a run whose worker died, and release its target.

    ``revision`` is what the target's ``alembic_version`` says now (read back by the caller), or
    None with ``revision_error`` when it could not be read. ``applied``: the revisions of the
    run's plan that the database shows committed, from ``revision_before`` (the revision the
    record held when the run started). The target is marked failed so that
    ``migrate_tenants --failed`` and the admin's retry pick it up.
    """
    now = timezone.now()
    applied = list(applied)
    if revision_error:
        where = f"Its revision could not be read back: {revision_error}"
    else:
        where = f"The target now stands at {revision or 'base (empty)'}."
        if applied:
            where += f" Before it stopped, the run had applied (committed) {', '.join(applied)}."
    provider = providers.get(run.target.provider)
    if not provider.transactional_ddl:
        undone = (
            f" {provider.partial_ddl}, so a revision that was running may be partly applied: "
            "compare the schema with it before running again."
        )
    else:
        undone = " A revision that had not committed was rolled back with its transaction."
    fields = dict(
        status=RunStatus.INTERRUPTED,
        finished_at=now,
        error_code="interrupted",
        retryable=True,
        revision_after=revision or "",
        applied=applied,
        error=(
            (
                # The qcluster's sentinel writes how a worker died on its running run.
                f"Interrupted: {run.error} "
                if run.error
                else f"Interrupted: the worker {run.worker_host or '(unknown)'} stopped sending "
                f"heartbeats (last at {run.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC) before it "
                "recorded the run; it was killed, lost its host or could not reach the control "
                "plane. "
            )
            + "The database released the target's lock with the worker's connection. "
            + where
            + undone
            + " Run it again with `migrate_tenants --failed` or the admin's retry."
        ),
    )
    if revision_before is not None:
        fields["revision_before"] = revision_before or ""
    updated = MigrationRun.objects.filter(pk=run.pk, status=RunStatus.RUNNING).update(**fields)
    if not updated:
        return False
    target = MigrationTarget.objects.select_for_update().get(pk=run.target_id)
    target.last_error = f"Run #{run.pk} was interrupted."
    target.last_checked_at = now
    fields = ["status", "last_error", "last_checked_at", "updated_at"]
    if not revision_error:
        target.revision = revision or ""
        fields.append("revision")
    if applied:
        target.last_migrated_at = now
        fields.append("last_migrated_at")
    save_status(target, TargetStatus.FAILED, fields)
    logger.warning("Run %s for %s was interrupted; target released", run.pk, target.name)
    return True


@transaction.atomic
def do_record_recovered_run(run, *, revision_before, revision, applied, heads):
    """Record a run whose worker stopped before it recorded the outcome (killed after the last
    commit, or unable to reach the control plane), when the target's database shows the run's
    whole plan done: the run succeeded (skipped when its plan was empty), with what was applied
    from ``revision_before`` (the record's revision when it started) to ``revision`` (read back
    from the database now). Returns False when the run was recorded meanwhile."""
    now = timezone.now()
    applied = list(applied)
    note = (
        f"The worker {run.worker_host or '(unknown)'} stopped sending heartbeats (last at "
        f"{run.heartbeat_at:%Y-%m-%d %H:%M:%S} UTC) before it recorded this run. Its database "
        f"was read back: it stands at {revision or 'base (empty)'}, where the run was to take "
        "it, so the run is recorded as completed"
        + (f", having applied {', '.join(applied)}." if applied else ", with nothing to apply.")
    )
    updated = MigrationRun.objects.filter(pk=run.pk, status=RunStatus.RUNNING).update(
        status=RunStatus.SUCCEEDED if applied else RunStatus.SKIPPED,
        finished_at=now,
        revision_before=revision_before or "",
        revision_after=revision or "",
        applied=applied,
        error="",
        error_code="",
        retryable=None,
        log=note,
    )
    if not updated:
        return False
    target = MigrationTarget.objects.select_for_update().get(pk=run.target_id)
    target.revision = revision or ""
    target.last_error = ""
    target.last_checked_at = now
    fields = ["status", "revision", "last_error", "last_checked_at", "updated_at"]
    if applied:
        target.last_migrated_at = now
        fields.append("last_migrated_at")
    save_status(target, target_status_for(target.revision, heads), fields)
    logger.warning("Run %s for %s recorded by recovery: %s", run.pk, target.name, note)
    return True
