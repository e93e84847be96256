"""Every state change of the record, as named actions (Zulip's ``zerver/actions`` style).

Admin actions, management commands, the creation signal, the HTTP API and the migration task
only call these. Each runs in a transaction, takes the acting user as a keyword where a person
acts, saves with ``update_fields``, and enqueues work with ``transaction.on_commit`` so a worker
never sees a run that was rolled back.
"""

import logging
import os
import socket
import uuid
from dataclasses import dataclass

from django.db import IntegrityError, connection, models, transaction
from django.utils import timezone

from migrator import process, providers
from migrator.redaction import redact
from tenants import routing
from tenants.models import (
    ACTIVE_RUN_STATUSES,
    MigrationRun,
    MigrationTarget,
    RunKind,
    RunStatus,
    TargetStatus,
)

logger = logging.getLogger("tenants.actions")

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


def worker_identity():
    """``host:pid`` of this process, recorded on the runs it executes."""
    return f"{socket.gethostname()}:{os.getpid()}"


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
            transaction.on_commit(lambda: _enqueue(new_runs))
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
    (``_enqueue`` pushes it after commit). When a concurrent trigger queued a run for one of
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
            return [_create_or_find_active_run(target, **fields) for target in targets]
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


def _create_or_find_active_run(target, **fields):
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


def _enqueue(runs):
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
    MigrationTarget.objects.filter(pk=run.target_id).update(status=_unless_held(status))
    run.target.status = status
    return run


def _unless_held(status):
    """``status`` for a target, as an expression that keeps a held target held: the record of a
    run that ends after its target was held says so without reading the target again."""
    return models.Case(
        models.When(held=True, then=models.Value(TargetStatus.HELD)),
        default=models.Value(status),
        output_field=models.CharField(),
    )


def _save_status(target, status, fields):
    """Save ``fields`` of ``target`` with ``status``, or ``held`` when it is held by then."""
    target.status = _unless_held(status)
    target.save(update_fields=fields)
    target.status = TargetStatus.HELD if target.held else status


@transaction.atomic
def do_set_held(target, *, held, acting_user=None):
    """Hold ``target`` (every migration skips it, and a queued one ends cancelled when it
    starts) or release it; its status says ``held`` while it is, and where it stands after.

    A released target is failed when its last run failed, migrating while a run is under way,
    else up to date or behind its heads (unknown before anything was read).
    """
    from migrator import runner

    target.held = held
    if held:
        status = TargetStatus.HELD
    elif target.runs.filter(status=RunStatus.RUNNING).exists():
        status = TargetStatus.MIGRATING
    elif target.last_error:
        status = TargetStatus.FAILED
    elif target.revision or target.last_checked_at:
        status = target_status_for(target.revision, runner.heads())
    else:
        status = TargetStatus.UNKNOWN
    target.status = status
    target.save(update_fields=["held", "status", "updated_at"])
    logger.info(
        "%s %s%s",
        target.name,
        "held" if held else "released",
        f" by {acting_user}" if acting_user else "",
    )
    return target


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


# --- Queued runs that no worker takes -----------------------------------------------------------


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
    _save_status(
        target, TargetStatus.FAILED, ["status", "last_error", "last_checked_at", "updated_at"]
    )
    logger.warning("Run %s for %s was abandoned in the queue", run.pk, target.name)
    return True


def target_status_for(revision, heads):
    """Up to date when every head is applied (is ``revision`` or below it:
    ``migrator.runner.up_to_date``), else behind."""
    from migrator import phases, runner

    if runner.up_to_date(heads, phases.applied(revision)):
        return TargetStatus.UP_TO_DATE
    return TargetStatus.BEHIND


def do_reconcile_statuses(heads):
    """Make the stored status of every target recorded up to date or behind agree with
    ``heads``: a revision deployed makes the targets at the old head behind at once (no run
    needed), and a head taken away makes those at the new one up to date. One read of the
    distinct (revision, status) pairs, and an UPDATE only where one disagrees; held, failed,
    migrating and unknown targets are left alone. Returns how many targets changed."""
    pairs = set(
        MigrationTarget.objects.filter(status__in=(TargetStatus.UP_TO_DATE, TargetStatus.BEHIND))
        .order_by()
        .values_list("revision", "status")
        .distinct()
    )
    wrong = {}  # the status a revision should show -> the revisions showing the other one
    for revision, status in pairs:
        should = target_status_for(revision, heads)
        if should != status:
            wrong.setdefault(should, []).append(revision)
    changed = 0
    now = timezone.now()
    for should, revisions in wrong.items():
        changed += (
            MigrationTarget.objects.filter(revision__in=revisions)
            .exclude(status=should)
            .filter(status__in=(TargetStatus.UP_TO_DATE, TargetStatus.BEHIND))
            .update(status=should, updated_at=now)
        )
    if changed:
        logger.info(
            "Head(s) now %s: %s target(s) moved between up to date and behind",
            ", ".join(heads) or "base",
            changed,
        )
    return changed


class _ReconciledHeads:
    """The heads this process last made the stored statuses agree with."""

    heads = None


def current_heads():
    """The script directory's head revision(s) as on disk now (``migrator.runner.heads``),
    after making the stored statuses agree with them: once per process each time they change,
    so the dashboard, /readyz, /metrics, the API and the admin never show a target up to date
    at a head that is no longer the head."""
    from migrator import runner

    heads = runner.heads()
    if heads != _ReconciledHeads.heads:
        do_reconcile_statuses(heads)
        _ReconciledHeads.heads = heads
    return heads


def reconcile_with_current_heads():
    """``current_heads()`` for pages and loops that show or keep statuses: None, logged, when
    the script directory cannot be read (the page says so its own way)."""
    try:
        return current_heads()
    except Exception:  # noqa: BLE001 - an unreadable directory must not take a page down
        logger.warning("Cannot read the head revision(s) to check the statuses", exc_info=True)
        return None


def _forget_reconciled_heads():
    """Reconcile again at the next ``current_heads`` (``process.reset()``). A forked worker
    keeps what its parent reconciled: the statuses agree with those heads either way."""
    _ReconciledHeads.heads = None


process.register("tenants.reconciled_heads", reset=_forget_reconciled_heads)


def _record_success(run, result, *, status, heads, changed, run_fields=(), target_fields=()):
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
        verified_fields, run.drift_report = _take_verification(target, verification, now)
        fields += verified_fields
        run_fields.append("drift_report")
    run.save(update_fields=run_fields)
    target.revision = run.revision_after
    target.last_error = ""
    target.last_checked_at = now
    if changed:
        target.last_migrated_at = now
        fields.append("last_migrated_at")
    _save_status(target, target_status_for(run.revision_after, heads), fields + ["updated_at"])
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
        run_fields += _take_backup(run, outcome.backup)
    if outcome.credentials is not None and outcome.credentials.mode != "static":
        run_fields += _take_credentials(run, outcome.credentials)
    if outcome.server and run.target.server != outcome.server:
        run.target.server = outcome.server
        target_fields.append("server")
    if outcome.error is None:
        result = outcome.result
        _record_success(
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
    run.save(update_fields=fields)

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
    _save_status(target, status, fields)
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


def do_heartbeat(run_id):
    """Mark a running run as alive; False when it is not running any more (recovered, cancelled)."""
    return bool(
        MigrationRun.objects.filter(pk=run_id, status=RunStatus.RUNNING).update(
            heartbeat_at=timezone.now()
        )
    )


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
    _save_status(target, TargetStatus.FAILED, fields)
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
    _save_status(target, target_status_for(target.revision, heads), fields)
    logger.warning("Run %s for %s recorded by recovery: %s", run.pk, target.name, note)
    return True


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
        retry, created = _create_or_find_active_run(
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
        transaction.on_commit(lambda: _enqueue([retry]) if at_once else _schedule(retry))
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


@transaction.atomic
def do_record_verification(
    target, verification, *, run=None, trigger=None, acting_user=None, record_run=False
):
    """Record what verifying ``target``'s schema found (a ``migrator.verify.Verification``).

    On the target: the fingerprint of its schema, whether it drifted from the reference for its
    revision, the drift report (schema and app-user grants) and, when it was compared, when.
    Its ``status`` is left alone: a drifted target is still up to date or behind.

    With ``run`` (the upgrade that was just verified) the report goes on that run. Without one
    (the fleet re-check, ``migrate_tenants --verify``) a finished run of kind ``verify`` is
    written when ``record_run`` is set, when drift appeared or went away, or when the report
    changed and shows drift or grant problems: the history says when each appeared, without a
    run per target per scheduled check. Returns that run, or None.
    """
    from tenants.models import Trigger

    now = timezone.now()
    was_drifted, previous_report = target.drifted, target.drift_report
    fields, report = _take_verification(target, verification, now)
    target.save(update_fields=fields + ["updated_at"])

    if run is not None:
        run.drift_report = report
        run.save(update_fields=["drift_report"])
        return run
    changed = report != previous_report
    if not (
        record_run
        or was_drifted != target.drifted
        or (changed and (verification.drifted or verification.grant_problems))
    ):
        return None
    revision = (verification.revision or "")[:64]
    return MigrationRun.objects.create(
        target=target,
        kind=RunKind.VERIFY,
        trigger=trigger or Trigger.SCHEDULE,
        triggered_by=acting_user,
        requested_revision=revision or "base",
        status=RunStatus.SUCCEEDED,
        revision_before=revision,
        revision_after=revision,
        duration_ms=verification.duration_ms,
        log="\n".join(verification.log_lines()),
        drift_report=report,
        started_at=now,
        finished_at=now,
    )


def _take_verification(target, verification, now):
    """Set what ``verification`` found on ``target`` (unsaved); return the fields it changed and
    the drift report."""
    report = verification.report()
    if verification.drifted and not target.drifted:
        logger.warning("%s drifted from the reference schema of its revision", target.name)
    target.drift_report = report
    target.drifted = verification.drifted
    fields = ["drift_report", "drifted"]
    if verification.fingerprint:
        target.schema_fingerprint = verification.fingerprint
        fields.append("schema_fingerprint")
    if verification.verified:
        target.verified_at = now
        fields.append("verified_at")
    return fields, report


# --- Admin credentials ---------------------------------------------------------------------------


def do_record_admin_credentials(run, use):
    """Record on ``run`` where its admin user came from (a ``migrator.secrets.CredentialsUse``):
    the mode, the user, the lease's safe form and whether it was revoked. Saved at once when the
    user is issued, so a run whose worker dies shows the lease it left, and again after the
    revocation."""
    run.save(update_fields=_take_credentials(run, use))
    return run


def _take_credentials(run, use):
    """Set where ``run``'s admin user came from on it (unsaved); return the fields."""
    run.admin_credentials = use.mode
    run.credentials_user = use.username[:128]
    run.credentials_lease = use.lease[:300]
    run.credentials_revoked = use.revoked
    return ["admin_credentials", "credentials_user", "credentials_lease", "credentials_revoked"]


# --- Backups and restores -----------------------------------------------------------------------


def do_record_backup(run, backup):
    """Record on ``run`` the backup taken before it changed anything (a
    ``migrator.backups.Backup``): path, size, sha256, duration, and the revision it holds as the
    run's ``revision_before``. Saved at once, so the backup stays on record whatever the run
    does next."""
    run.save(update_fields=_take_backup(run, backup))
    return run


def _take_backup(run, backup):
    """Set ``backup`` on ``run`` (unsaved); return the fields."""
    run.backup_path = backup.path
    run.backup_size = backup.size
    run.backup_checksum = backup.checksum
    run.backup_duration_ms = backup.duration_ms
    run.revision_before = backup.revision or ""
    return [
        "backup_path",
        "backup_size",
        "backup_checksum",
        "backup_duration_ms",
        "revision_before",
    ]


def do_start_restore_run(target, *, backup_run, worker_host, trigger=None, acting_user=None):
    """Create a restore run of ``backup_run``'s backup on ``target`` and start it at once.

    The run is created queued and moved to running like any run, so the database's
    ``one_active_run_per_target`` constraint guards it: when the target already has a queued or
    running run, nothing is created and the ``Dispatch`` carries that run (``created`` False).
    Held targets may be restored: holding a target is how an operator keeps migrations off it.
    """
    from tenants.models import Trigger

    with transaction.atomic():
        run, created = _create_or_find_active_run(
            target,
            kind=RunKind.RESTORE,
            trigger=trigger or Trigger.COMMAND,
            triggered_by=acting_user,
            requested_revision=backup_run.revision_before or "base",
            restored_from=backup_run,
        )
    asked = {"kind": RunKind.RESTORE, "revision": backup_run.revision_before or "base"}
    if not created:
        return Dispatch(target, run, False, **asked)
    started = do_start_run(run.pk, worker_host=worker_host)
    if started is None:
        run.refresh_from_db()
        return Dispatch(
            target, None, False, f"restore run #{run.pk} was {run.status} at once", **asked
        )
    logger.info(
        "Restore of run %s's backup started on %s (run %s)", backup_run.pk, target.name, run.pk
    )
    return Dispatch(target, started, True, **asked)


@transaction.atomic
def do_record_restore(run, result, *, heads):
    """Record a successful restore (a ``migrator.backups.RestoreResult``) on the run, and the
    revision read back from the target's ``alembic_version`` on the target."""
    _record_success(run, result, status=RunStatus.SUCCEEDED, heads=heads, changed=True)
    target = run.target
    logger.info("Restored %s (run %s); it stands at %s", target.name, run.pk, target.revision)
    return run


# --- Retiring tenants and targets ---------------------------------------------------------------


@dataclass(frozen=True)
class Decommission:
    """What retiring a tenant or a target did: ``done`` (now retired), or ``refusal``."""

    done: bool
    refusal: str = ""
    cancelled: tuple = ()  # runs cancelled (they were queued)


def do_decommission_target(target, *, acting_user=None):
    """Retire ``target``: the planner and the queue refuse it every run from now on, saying so;
    its runs, backups and history are kept. Its queued run is cancelled. Refused while a run is
    running (it holds the database's lock: wait for it) or while tenants that are not
    decommissioned live in it (a shared database: retire or move them first).
    """
    from tenants.models import Tenant

    with transaction.atomic():
        target = MigrationTarget.objects.select_for_update().get(pk=target.pk)
        if target.decommissioned_at is not None:
            return Decommission(False, f"{target.name} is already decommissioned.")
        running = target.runs.filter(status=RunStatus.RUNNING).first()
        if running is not None:
            return Decommission(
                False,
                f"Run #{running.pk} is migrating {target.name}: wait for it to finish, then "
                "decommission the target.",
            )
        living = list(
            Tenant.objects.filter(target=target, decommissioned_at=None).values_list(
                "id", flat=True
            )[:11]
        )
        if living:
            more = ", …" if len(living) > 10 else ""
            return Decommission(
                False,
                f"{target.name} still holds tenant(s) {', '.join(living[:10])}{more}: "
                "decommission them first.",
            )
        cancelled, _ = do_cancel_queued_runs([target], acting_user=acting_user)
        target.decommissioned_at = timezone.now()
        target.save(update_fields=["decommissioned_at", "updated_at"])
    logger.info("Target %s decommissioned by %s", target.name, acting_user or "an operator")
    return Decommission(True, cancelled=tuple(cancelled))


def do_decommission_tenant(tenant, *, acting_user=None):
    """Retire ``tenant``; a dedicated or external tenant's own database is retired with it
    (``do_decommission_target``: no more runs, history kept, its queued run cancelled). A
    shared-tier tenant leaves its shared database as it is. Refused while its own database has
    a running run."""
    from tenants.models import Strategy, Tenant

    with transaction.atomic():
        tenant = Tenant.objects.select_for_update().select_related("target").get(pk=tenant.pk)
        if tenant.decommissioned_at is not None:
            return Decommission(False, f"Tenant {tenant.id} is already decommissioned.")
        tenant.decommissioned_at = timezone.now()
        tenant.save(update_fields=["decommissioned_at"])
        target = tenant.target
        if tenant.strategy == Strategy.SHARED or target is None or target.decommissioned:
            outcome = Decommission(True)
        else:
            outcome = do_decommission_target(target, acting_user=acting_user)
            if not outcome.done:
                transaction.set_rollback(True)
                return Decommission(False, f"Tenant {tenant.id}: {outcome.refusal}")
    logger.info("Tenant %s decommissioned by %s", tenant.id, acting_user or "an operator")
    return outcome
