"""The next attempt of a run that failed with a retryable error: its back-off, and the queued
run that django-q2's scheduler (or the broker at once) hands to a worker.
"""

import logging

from django.db import transaction
from django.utils import timezone

from tenants import routing
from tenants.actions.dispatch import MIGRATION_TASK, create_or_find_active_run, hand_to_queue

logger = logging.getLogger(__name__)


def retry_delay_seconds(attempt):
    """Back-off before attempt ``attempt + 1``: the base delay, doubled for each earlier retry."""
    from django.conf import settings

    return settings.RUN_RETRY_BACKOFF_SECONDS * (2 ** (attempt - 1))


def do_schedule_retry(run, *, at_once=False):
    """Queue the next attempt of a run that failed with a retryable error, after a back-off.

    Returns the new run, or None when the attempts are used up or another run already took the
    target. The retry is a queued run from now on (so no other trigger starts a second
    migration); django-q2's scheduler hands it to a worker once ``not_before`` has passed.
    ``at_once`` (a run abandoned in an idle queue) hands it to the broker now instead.
    """
    from datetime import timedelta

    from django.conf import settings

    if run.attempt >= settings.RUN_MAX_ATTEMPTS:
        return None
    delay = 0 if at_once else retry_delay_seconds(run.attempt)
    with transaction.atomic():
        retry, created = create_or_find_active_run(
            run.target,
            kind=run.kind,
            trigger=run.trigger,
            triggered_by=run.triggered_by,
            requested_revision=run.requested_revision,
            batch=run.batch,
            phase=run.phase,
            rollout_id=run.rollout_id,
            attempt=run.attempt + 1,
            not_before=None if at_once else timezone.now() + timedelta(seconds=delay),
        )
        if not created:
            return None
        transaction.on_commit(lambda: hand_to_queue([retry]) if at_once else _schedule(retry))
    logger.info(
        "Run %s for %s failed with a retryable error; attempt %s in %ss (run %s)",
        run.pk,
        run.target.name,
        retry.attempt,
        delay,
        retry.pk,
    )
    return retry


def _schedule(run):
    from django_q.models import Schedule
    from django_q.tasks import schedule

    schedule(
        MIGRATION_TASK,
        run.pk,
        name=f"retry-run-{run.pk}",
        schedule_type=Schedule.ONCE,
        repeats=-1,
        next_run=run.not_before,
        cluster=routing.cluster_for(run.target.region),
    )
