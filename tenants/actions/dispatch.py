"""Queueing runs: one queued run per target (in bulk, for fleets of ten thousand), handed to
each region's cluster's broker after commit, and what a trigger did for each target
(``Dispatch``).
"""

import logging
import os
import uuid
from dataclasses import dataclass

from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from migrator.redaction import redact
from tenants import routing
from tenants.models import (
    ACTIVE_RUN_STATUSES,
    MigrationRun,
    MigrationTarget,
    RunKind,
    RunStatus,
)

logger = logging.getLogger(__name__)


MIGRATION_TASK = "migrator.tasks.run_migration"


@dataclass(frozen=True)
class Dispatch:
    """What a trigger did for one target: a new run, the run already under way, or nothing.

    ``kind`` and ``revision`` are what was asked: when the run already under way does something
    else (a downgrade asked while an upgrade is queued), the request was not carried out.
    """

    target: MigrationTarget
    run: MigrationRun | None
    created: bool
    reason: str = ""
    kind: str = RunKind.UPGRADE
    revision: str = "head"

    @property
    def carried_out(self):
        """A run doing what was asked exists: a new one the queue took, or one under way with
        the same aim."""
        if self.run is None or self.unqueued:
            return False
        return self.created or (
            self.run.kind == self.kind and self.run.requested_revision == self.revision
        )

    @property
    def unqueued(self):
        """A new run that the queue broker refused: closed as failed, nothing ran."""
        return self.created and self.run is not None and self.run.error_code == "queue_unavailable"

    @property
    def message(self):
        if self.run is None:
            return f"Not queued for {self.target.name}: {self.reason}."
        if self.unqueued:
            return f"Run #{self.run.pk} for {self.target.name} was not queued: {self.run.error}"
        if self.created:
            return (
                f"Run #{self.run.pk} queued for {self.target.name} ({self.run.requested_revision})."
            )
        if not self.carried_out:
            return (
                f"Run #{self.run.pk} for {self.target.name} is already {self.run.status} "
                f"({self.run.kind} to {self.run.requested_revision}); your {self.kind} to "
                f"{self.revision} was not queued. Cancel that run or wait for it, then ask again."
            )
        return (
            f"Run #{self.run.pk} for {self.target.name} is already {self.run.status}; "
            "no second migration was started."
        )


def do_enqueue_runs(
    targets,
    *,
    trigger,
    acting_user=None,
    revision="head",
    kind=RunKind.UPGRADE,
    batch=None,
    enqueue=True,
    phase="",
    rollout=None,
):
    """Create one queued run per target and hand each to the task queue after commit.

    A target that already has a queued or running run gets no second one: the database's
    ``one_active_run_per_target`` constraint decides, so concurrent triggers (two admins, twenty
    API calls, two control planes on one database) can never start two migrations of one target.
    Held targets are left alone. Returns one ``Dispatch`` per target, in order.

    With ``enqueue=False`` the runs are created but not queued: the caller executes them itself
    (``migrate_tenants --sync``).
    """
    batch = batch or uuid.uuid4()
    targets = list(targets)
    dispatches = [None] * len(targets)
    with transaction.atomic():
        wanted = []  # (position, target) of the targets that get a run
        unrouted_in = {}  # region: why no cluster takes its runs ("" when one does)
        for position, target in enumerate(targets):
            if target.decommissioned_at is not None:
                dispatches[position] = Dispatch(
                    target, None, False, target.decommissioned_reason, kind, revision
                )
                continue
            if target.held:
                dispatches[position] = Dispatch(
                    target, None, False, "the target is held", kind, revision
                )
                continue
            if enqueue:
                if target.region not in unrouted_in:
                    unrouted_in[target.region] = routing.unrouted_reason(target.region)
                unrouted = unrouted_in[target.region]
                if unrouted:
                    dispatches[position] = Dispatch(target, None, False, unrouted, kind, revision)
                    continue
            wanted.append((position, target))
        runs = _create_or_find_active_runs(
            [target for _, target in wanted],
            with_task_ids=enqueue,
            kind=kind,
            trigger=trigger,
            triggered_by=acting_user,
            requested_revision=revision,
            batch=batch,
            phase=phase,
            rollout=rollout,
        )
        for (position, target), (run, created) in zip(wanted, runs, strict=True):
            dispatches[position] = Dispatch(target, run, created, "", kind, revision)
        new_runs = [d.run for d in dispatches if d.created]
        if enqueue and new_runs:
            transaction.on_commit(lambda: hand_to_queue(new_runs))
    created = sum(d.created for d in dispatches)
    logger.info(
        "%s run(s) queued by %s%s for %s target(s)",
        created,
        trigger,
        f" ({acting_user})" if acting_user else "",
        len(dispatches),
    )
    return dispatches


def do_enqueue_plan(rows, *, trigger, acting_user=None, enqueue=True, batch=None, rollout=None):
    """Queue the accepted rows of a plan (``tenants.planning.plan``), each as it was shown: its
    kind, its destination, its phase; all in one batch (runs of ``rollout``, when a rollout
    queues them). Returns one ``Dispatch`` per accepted row, in order; rows refused or left out
    by the planner get none.
    """
    batch = batch or uuid.uuid4()
    accepted = [row for row in rows if row.accepted]
    groups = {}
    for position, row in enumerate(accepted):
        key = (row.kind, row.destination, row.phase)
        groups.setdefault(key, []).append(position)
    dispatches = [None] * len(accepted)
    with transaction.atomic():
        for (kind, destination, phase), positions in groups.items():
            found = do_enqueue_runs(
                [accepted[p].target for p in positions],
                trigger=trigger,
                acting_user=acting_user,
                revision=destination,
                kind=kind,
                phase=phase,
                batch=batch,
                enqueue=enqueue,
                rollout=rollout,
            )
            for position, dispatch in zip(positions, found, strict=True):
                dispatches[position] = dispatch
    return dispatches


# Rows per INSERT and ids per IN list: under SQLite's limit of 999 parameters per statement.
_BULK = 500


def _create_or_find_active_runs(targets, *, with_task_ids=False, **fields):
    """``(run, created)`` for each of ``targets``: a new queued run, or the target's active one.

    In bulk: one query per few hundred targets for the runs already active, one batched INSERT
    for the others and one query to read their ids back (``_insert_runs``), so queueing a fleet
    of ten thousand costs a few dozen statements, not ten thousand savepoints.
    ``with_task_ids``: each new run gets the id of the django-q2 task that will carry it
    (``hand_to_queue`` pushes it after commit). When a concurrent trigger queued a run for one of
    them in between, the constraint refuses the INSERT and each target is then taken one at a
    time.
    """
    active = {}
    ids = [target.pk for target in targets]
    for start in range(0, len(ids), _BULK):
        for run in MigrationRun.objects.filter(
            target_id__in=ids[start : start + _BULK], status__in=ACTIVE_RUN_STATUSES
        ):
            active[run.target_id] = run
    unique = {target.pk: target for target in targets if target.pk not in active}
    new = {}
    if unique:
        try:
            with transaction.atomic():
                new = _insert_runs(list(unique.values()), fields, with_task_ids=with_task_ids)
        except IntegrityError:
            return [create_or_find_active_run(target, **fields) for target in targets]
    results = []
    for target in targets:
        run = active.get(target.pk)
        if run is not None:
            run.target = target
            results.append((run, False))
        else:
            results.append((new[target.pk], True))
            active[target.pk] = new[target.pk]  # a target listed twice gets one run
    return results


def _insert_runs(targets, fields, *, with_task_ids):
    """Insert a queued run with ``fields`` for each of ``targets`` (none has an active run);
    return {target id: run}.

    Django's ``bulk_create`` converts every field of every object for the database, and the
    objects are built from keyword arguments: 3 s for 10,000 runs here. These runs differ only
    in their target and task id: each column's value is converted once, the rows go in one
    ``COPY`` on PostgreSQL and one ``executemany`` elsewhere, their ids are read back by batch
    (a target's one active run in it is the new one: the constraint says so), and the runs are
    built as Django builds what it reads (``from_db``).
    """
    quote = connection.ops.quote_name
    meta = MigrationRun._meta
    prototype = MigrationRun(**fields)
    columns = [field for field in meta.concrete_fields if not field.primary_key]
    values = [
        field.get_db_prep_save(field.pre_save(prototype, True), connection) for field in columns
    ]
    attnames = [field.attname for field in columns]
    at_target, at_task = attnames.index("target_id"), attnames.index("task_id")
    # Random 128-bit ids, as django-q2's (uuid4), from one read of the system's random source.
    random = os.urandom(16 * len(targets)).hex() if with_task_ids else ""
    task_ids = {target.pk: random[32 * i : 32 * i + 32] for i, target in enumerate(targets)}
    rows = []
    for target in targets:
        row = list(values)
        row[at_target], row[at_task] = target.pk, task_ids[target.pk]
        rows.append(row)
    table = quote(meta.db_table)
    names = ", ".join(quote(field.column) for field in columns)  # the model's: no user input
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # One COPY: Django binds parameters on the client, so PostgreSQL would parse and
            # plan each INSERT of an executemany anew (3 s of its time for 10,000 here).
            with (
                connection.wrap_database_errors,
                cursor.copy(f"COPY {table} ({names}) FROM STDIN") as copy,
            ):
                for row in rows:
                    copy.write_row(row)
        else:
            cursor.executemany(  # sqlite3 runs it in C, on one prepared statement
                f"INSERT INTO {table} ({names}) VALUES ({', '.join(['%s'] * len(columns))})",  # noqa: S608
                rows,
            )
    # The batch's active runs: ours, and those of its earlier groups (other targets).
    pks = dict(
        MigrationRun.objects.filter(
            batch=prototype.batch, status__in=ACTIVE_RUN_STATUSES
        ).values_list("target_id", "pk")
    )
    attnames = [field.attname for field in meta.concrete_fields]
    attributes = [getattr(prototype, name) for name in attnames]
    at_pk, at_target, at_task = (
        attnames.index(meta.pk.attname),
        attnames.index("target_id"),
        attnames.index("task_id"),
    )
    at_applied = attnames.index("applied")
    runs = {}
    for target in targets:
        row = list(attributes)
        row[at_pk], row[at_target], row[at_task] = pks[target.pk], target.pk, task_ids[target.pk]
        row[at_applied] = []
        run = MigrationRun.from_db(connection.alias, None, row)
        run.target = target
        runs[target.pk] = run
    return runs


def create_or_find_active_run(target, **fields):
    """Insert a queued run, or return the target's active run when the constraint says one is."""
    for _ in range(3):
        try:
            with transaction.atomic():
                return MigrationRun.objects.create(target=target, **fields), True
        except IntegrityError:
            active = target.runs.filter(status__in=ACTIVE_RUN_STATUSES).first()
            if active is not None:
                return active, False
            # The active run finished between our insert and this read: insert again.
    raise RuntimeError(f"Could not queue a run for {target.name}: it keeps changing state.")


def hand_to_queue(runs):
    """Hand ``runs`` to django-q2, each to its region's cluster: their messages signed as
    ``async_task`` signs them and pushed all at once, one broker call per cluster
    (``tenants.broker``); the task id of a run that had none (a retry) is recorded.

    A run is left queued only once its broker accepted its message. When a broker refuses the
    push (Redis down, the control-plane database gone for the ORM broker), that cluster's runs
    are closed as failed with ``error_code`` ``queue_unavailable``, saying so
    (``do_record_enqueue_failure``): nothing ran, and nothing is left queued that no worker will
    ever take. Each run object is updated in place, so the caller's ``Dispatch`` shows it.
    """
    from django_q.brokers import get_broker

    from tenants import broker as queue

    by_cluster = {}
    for run in runs:
        by_cluster.setdefault(routing.cluster_for(run.target.region), []).append(run)
    started = timezone.now()
    unrecorded = [run for run in runs if not run.task_id]
    for run in unrecorded:
        run.task_id = uuid.uuid4().hex
    refused = []
    for cluster, group in by_cluster.items():
        try:
            messages = [
                queue.message(
                    MIGRATION_TASK,
                    run.pk,
                    task_id=run.task_id,
                    name=f"run-{run.pk}-{run.target.name}",
                    cluster=cluster,
                    started=started,
                )
                for run in group
            ]
            queue.push(get_broker(cluster), messages)
        except Exception as exc:  # noqa: BLE001 - any broker error: the runs are not queued
            logger.error("The queue broker refused %s run(s): %s", len(group), exc)
            refused.append((exc, group))
    for error, unqueued in refused:
        do_record_enqueue_failure(unqueued, error)
    MigrationRun.objects.bulk_update(
        [run for run in unrecorded if run.task_id], ["task_id"], batch_size=_BULK
    )


def broker_location():
    """Where django-q2's broker is, for messages: a Redis URL without its password, or the
    control plane's own database (the ORM broker)."""
    from urllib.parse import urlsplit

    from django.conf import settings

    if settings.REDIS_URL:
        url = urlsplit(settings.REDIS_URL)
        host = url.hostname or "localhost"
        return f"{url.scheme}://{host}:{url.port or 6379}{url.path or ''}"
    return "the control plane's database (ORM broker)"


def do_record_enqueue_failure(runs, error):
    """Close ``runs``, whose messages the broker refused, as failed: nothing ran, nothing is
    left queued. The targets are left as they stand (nothing touched them)."""
    reason = redact(str(error)) or type(error).__name__
    message = (
        f"The queue broker at {broker_location()} refused the task ({type(error).__name__}: "
        f"{reason}); nothing ran. Run it again when the broker is back (check REDIS_URL and "
        "that Redis is running)."
        if "redis" in broker_location()
        else f"The queue broker ({broker_location()}) refused the task "
        f"({type(error).__name__}: {reason}); nothing ran. Run it again when it is back."
    )
    now = timezone.now()
    ids = [run.pk for run in runs]
    for start in range(0, len(ids), _BULK):
        MigrationRun.objects.filter(
            pk__in=ids[start : start + _BULK], status=RunStatus.QUEUED
        ).update(
            status=RunStatus.FAILED,
            error=message,
            error_code="queue_unavailable",
            retryable=True,
            finished_at=now,
            task_id="",  # no message of it was taken
        )
    for run in runs:
        run.status, run.error, run.error_code = RunStatus.FAILED, message, "queue_unavailable"
        run.retryable, run.finished_at, run.task_id = True, now, ""
    return message
