"""A run in its worker's hands: who the worker is, the start (queued to running, or cancelled
when its target was held meanwhile), and the heartbeat that says it is alive.
"""

import functools
import logging
import os
import socket

from django.db import connection, models
from django.utils import timezone

from tenants import routing
from tenants.actions.saves import unless_held_sql
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
    """Move a queued run to running; return it (with its target), or None when it is not queued
    any more.

    The conditional UPDATE makes the start atomic: a cancelled run, or a run a second worker
    already took, is never executed. Nor is a migration of a target held after its run was
    queued: that run ends cancelled, saying so (a restore still runs: holding a target keeps
    migrations off it, not the operator's restore). The target is marked migrating, unless it
    is held.
    """
    now = timezone.now()
    running = (now, worker_host, routing.current_cluster())
    if _returns_rows():
        run = _start_returning(run_id, *running)
    else:
        run = _start_with_orm(run_id, *running)
    if run is not None:
        return run
    queued = MigrationRun.objects.filter(pk=run_id, status=RunStatus.QUEUED)
    if queued.filter(target__held=True).update(
        status=RunStatus.CANCELLED,
        finished_at=now,
        error_code="held",
        error=HELD_BEFORE_START,
        worker_host=worker_host,
    ):
        logger.info("Run %s cancelled: its target was held before it started", run_id)
    return None


def _returns_rows():
    """Can the control-plane database return the rows an UPDATE wrote (``RETURNING``)?
    PostgreSQL can, and SQLite from 3.35 (Django's flag for returning rows from an INSERT says
    when); MySQL and MariaDB cannot."""
    return connection.vendor == "postgresql" or (
        connection.vendor == "sqlite" and connection.features.can_return_rows_from_bulk_insert
    )


def _start_returning(run_id, now, worker_host, worker_cluster):
    """The start in two statements, their SQL built once (``_start_sql``): the run taken,
    returned as written, then its target marked migrating unless held, returned as written.
    Django's own took three (the run read again with its target) and compiled each anew, which
    was most of a start's CPU."""
    take, mark = _start_sql(connection.vendor)
    params = [RunStatus.RUNNING, now, now, worker_host, worker_cluster]
    params += [run_id, RunStatus.QUEUED, RunKind.RESTORE]
    runs = list(MigrationRun.objects.raw(take, params))
    if not runs:
        return None
    [run] = runs
    [run.target] = MigrationTarget.objects.raw(
        mark, [TargetStatus.HELD, TargetStatus.MIGRATING, run.target_id]
    )
    return run


@functools.cache
def _start_sql(vendor):
    """The two UPDATEs of a start, with every column of their rows returned (quoted for
    ``vendor``): built once per process, from the models' definitions alone.

    The run is taken when it is queued and its target is not held (or it is a restore). The
    target is read by its primary key in a subquery of its own: the ORM's join (``id IN
    (SELECT ... JOIN ...)``) says the same, in more SQL to compile.
    """
    quote = connection.ops.quote_name
    run, target = MigrationRun._meta, MigrationTarget._meta
    run_table, target_table = quote(run.db_table), quote(target.db_table)

    def returning(meta):
        return ", ".join(quote(field.column) for field in meta.concrete_fields)

    # Only the models' own names go into the SQL; every value is a parameter.
    take = (
        f"UPDATE {run_table} SET {quote('status')} = %s, {quote('started_at')} = %s, "  # noqa: S608
        f"{quote('heartbeat_at')} = %s, {quote('worker_host')} = %s, "
        f"{quote('worker_cluster')} = %s "
        f"WHERE {quote('id')} = %s AND {quote('status')} = %s AND ({quote('kind')} = %s "
        f"OR NOT (SELECT {quote('held')} FROM {target_table} "
        f"WHERE {target_table}.{quote('id')} = {run_table}.{quote('target_id')})) "
        f"RETURNING {returning(run)}"
    )
    mark = (
        f"UPDATE {target_table} "  # noqa: S608
        f"SET {quote('status')} = {unless_held_sql()} "
        f"WHERE {quote('id')} = %s RETURNING {returning(target)}"
    )
    return take, mark


def _start_with_orm(run_id, now, worker_host, worker_cluster):
    """The start through the ORM, where an UPDATE cannot return its row: the run taken, read
    again with its target, and the target marked migrating unless held."""
    queued = MigrationRun.objects.filter(pk=run_id, status=RunStatus.QUEUED)
    started = queued.filter(models.Q(target__held=False) | models.Q(kind=RunKind.RESTORE)).update(
        status=RunStatus.RUNNING,
        started_at=now,
        heartbeat_at=now,
        worker_host=worker_host,
        worker_cluster=worker_cluster,
    )
    if not started:
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
