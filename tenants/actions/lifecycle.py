"""A run in its worker's hands: who the worker is, the start (queued to running, or cancelled
when its target was held meanwhile), and the heartbeat that says it is alive.
"""

import logging
import os
import socket

from django.db import models
from django.utils import timezone

from tenants import routing
from tenants.actions.statuses import unless_held
from tenants.models import MigrationRun, MigrationTarget, RunKind, RunStatus, TargetStatus

logger = logging.getLogger(__name__)


def worker_identity():
    """``host:pid`` of this process, recorded on the runs it executes."""
    return f"{socket.gethostname()}:{os.getpid()}"


HELD_BEFORE_START = (
    "The target was held before the run started; nothing ran. Release it, then run it again."
)


def do_start_run(run_id, *, worker_host):
    """Move a queued run to running; return it, or None when it is not queued any more.

    The conditional UPDATE makes the start atomic: a cancelled run, or a run a second worker
    already took, is never executed. Nor is a migration of a target held after its run was
    queued: that run ends cancelled, saying so (a restore still runs: holding a target keeps
    migrations off it, not the operator's restore).
    """
    now = timezone.now()
    queued = MigrationRun.objects.filter(pk=run_id, status=RunStatus.QUEUED)
    started = queued.filter(models.Q(target__held=False) | models.Q(kind=RunKind.RESTORE)).update(
        status=RunStatus.RUNNING,
        started_at=now,
        heartbeat_at=now,
        worker_host=worker_host,
        worker_cluster=routing.current_cluster(),
    )
    if not started:
        if queued.filter(target__held=True).update(
            status=RunStatus.CANCELLED,
            finished_at=now,
            error_code="held",
            error=HELD_BEFORE_START,
            worker_host=worker_host,
        ):
            logger.info("Run %s cancelled: its target was held before it started", run_id)
        return None
    run = MigrationRun.objects.select_related("target").get(pk=run_id)
    status = TargetStatus.HELD if run.target.held else TargetStatus.MIGRATING
    MigrationTarget.objects.filter(pk=run.target_id).update(status=unless_held(status))
    run.target.status = status
    return run


def do_heartbeat(run_id):
    """Mark a running run as alive; False when it is not running any more (recovered, cancelled)."""
    return bool(
        MigrationRun.objects.filter(pk=run_id, status=RunStatus.RUNNING).update(
            heartbeat_at=timezone.now()
        )
    )
