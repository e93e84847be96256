"""Cancelling queued runs, before any worker starts them."""

import logging

from django.utils import timezone

from tenants.models import ACTIVE_RUN_STATUSES, MigrationRun, RunStatus

logger = logging.getLogger(__name__)


def do_cancel_run(run, *, acting_user=None):
    """Cancel a queued run. A running run cannot be cancelled: it is inside the target's lock.

    The conditional UPDATE decides against a worker starting it at the same moment: a cancelled
    run is never started (``do_start_run`` takes only queued runs), and its message, still in
    the broker, does nothing when a worker reads it. The target is left as it stands: a queued
    run has not touched it.
    """
    cancelled = MigrationRun.objects.filter(pk=run.pk, status=RunStatus.QUEUED).update(
        status=RunStatus.CANCELLED,
        finished_at=timezone.now(),
        error_code="cancelled",
        error=f"Cancelled by {acting_user or 'an operator'} before it started; nothing ran.",
    )
    run.refresh_from_db()
    if cancelled:
        logger.info("Run %s for %s cancelled by %s", run.pk, run.target.name, acting_user)
    return bool(cancelled)


def do_cancel_queued_runs(targets, *, acting_user=None):
    """Cancel the queued run of each of ``targets`` (those that have one). Returns
    ``(cancelled runs, runs left running)``: a running run cannot be cancelled."""
    ids = [target.pk for target in targets]
    cancelled, running = [], []
    for run in MigrationRun.objects.filter(
        target_id__in=ids, status__in=ACTIVE_RUN_STATUSES
    ).select_related("target"):
        if run.status == RunStatus.QUEUED and do_cancel_run(run, acting_user=acting_user):
            cancelled.append(run)
        elif run.status == RunStatus.RUNNING:
            running.append(run)
    return cancelled, running
