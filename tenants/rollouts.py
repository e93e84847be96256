"""Rollouts: a selection of targets taken to a revision in waves, halting when a failure budget
is spent (docs/rollouts.md).

``plan_rollout`` turns targets and an ``Intent`` into a ``RolloutPlan`` (the planner's rows,
ordered canaries first and then spread over regions and providers, cut into waves): a value
every interface shows before anything runs. ``do_start_rollout`` records it and takes its first
step. ``advance`` is the one step function that moves a rollout on: it queues what the current
wave may run now (per-server cap, maintenance windows), halts when the budget is spent, bakes a
finished wave, starts the next one, completes. It is called when a run of the rollout is
recorded (``advance_after_run``, from the bridge) and by each ``qcluster``'s main process every
``RUN_HEARTBEAT_SECONDS`` (``advance_active``), so bake times and windows move on without a run
finishing. Each step queues through the planner (``tenants.planning.plan``) and
``tenants.actions.do_enqueue_plan``, as every other entry point does.
"""

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from tenants import actions, planning
from tenants.models import (
    ACTIVE_ROLLOUT_STATUSES,
    ACTIVE_RUN_STATUSES,
    MigrationRun,
    MigrationTarget,
    Rollout,
    RolloutStatus,
    RunStatus,
)

logger = logging.getLogger("tenants.rollouts")

HALTED_CODE = "rollout_halted"
ABORTED_CODE = "rollout_aborted"

# A target's state in a rollout.
PENDING = "pending"  # not sent yet (untouched)
ACTIVE = "active"  # its run is queued or running (or a retry is about to be queued)
DONE = "done"  # succeeded, or nothing to apply
FAILED = "failed"  # its run failed, or the planner refused it when its wave started
SKIPPED = "skipped"  # held or decommissioned when its wave started: no run, not a failure
WAITING = "waiting"  # pending, outside its maintenance window


class WavesError(ValueError):
    """A ``--waves`` spec that cannot be read."""


def parse_waves(spec, total):
    """The cumulative sizes of the waves ``spec`` asks for over ``total`` targets.

    ``spec`` is a comma-separated list of counts (``5``: the first 5 targets in all) and
    percentages (``10%``: the first tenth, rounded up), each cumulative and growing: ``1,10%,
    50%,100%``. The targets left after the last entry form one more wave. Entries that add no
    target (10% of 5 is 1, already reached) are dropped. Raises ``WavesError`` saying what is
    wrong."""
    entries = [entry.strip() for entry in (spec or "").split(",")]
    if not spec or not spec.strip() or any(not entry for entry in entries):
        raise WavesError(
            f"--waves {spec!r}: give counts or cumulative percentages separated by commas, "
            "e.g. 1,10%,50%,100%"
        )
    sizes, last, asked = [], 0, 0
    for entry in entries:
        try:
            if entry.endswith("%"):
                percent = float(entry[:-1])
                if not 0 < percent <= 100:
                    raise ValueError
                size = math.ceil(total * percent / 100)
            else:
                size = int(entry)
                if size < 1:
                    raise ValueError
        except ValueError:
            raise WavesError(
                f"--waves {spec!r}: {entry!r} is neither a count (1 or more) nor a percentage "
                "(above 0% up to 100%)"
            ) from None
        if size < asked:
            raise WavesError(
                f"--waves {spec!r}: each entry is cumulative (the targets reached so far), so "
                f"{entry!r} cannot come after a larger one"
            )
        asked = size
        size = min(size, total)
        if size > last:
            sizes.append(size)
            last = size
    if last < total:
        sizes.append(total)
    return sizes


def order_targets(targets):
    """``targets`` in rollout order: canaries first, then the others, each group interleaved
    round-robin over (region, provider) so that every wave spreads over regions and providers.
    """

    def interleave(group):
        buckets = {}
        for target in sorted(group, key=lambda t: t.name):
            buckets.setdefault((target.region, target.provider), []).append(target)
        queues = [buckets[key] for key in sorted(buckets)]
        ordered = []
        while any(queues):
            for queue in queues:
                if queue:
                    ordered.append(queue.pop(0))
        return ordered

    targets = list(targets)
    return interleave([t for t in targets if t.canary]) + interleave(
        [t for t in targets if not t.canary]
    )


@dataclass
class RolloutPlan:
    """What a rollout would do, before anything runs: the planner's accepted rows in waves, and
    the rows that are not part of it (refused or left out, each with its reason)."""

    intent: planning.Intent
    spec: str
    waves: list = field(default_factory=list)  # lists of PlanRow
    not_included: list = field(default_factory=list)  # PlanRow

    @property
    def size(self):
        return sum(len(wave) for wave in self.waves)

    def as_dict(self):
        return {
            "revision": self.intent.revision,
            "waves_spec": self.spec,
            "waves": [
                [{**row.as_dict(), "region": row.target.region} for row in wave]
                for wave in self.waves
            ],
            "not_included": [row.as_dict() for row in self.not_included],
        }

    def table(self):
        """The order, wave by wave, as plain text."""
        lines = []
        for number, wave in enumerate(self.waves, 1):
            lines.append(f"Wave {number} ({len(wave)} target(s)):")
            for row in wave:
                target = row.target
                canary = " canary" if target.canary else ""
                lines.append(
                    f"  {target.name}  {target.region}/{target.provider}{canary}  "
                    f"{row.stands or 'base'} -> {row.goes_to}"
                )
        for row in self.not_included:
            lines.append(f"Not included: {row.target.name}: {row.reason}")
        return "\n".join(lines)


def plan_rollout(targets, intent, spec):
    """The ``RolloutPlan`` of taking ``targets`` to ``intent`` in the waves ``spec`` asks for
    (``parse_waves``; raises ``WavesError``). Reads no database: where each target stands is
    the record's (``tenants.planning.plan``); each wave is planned again when it starts."""
    rows = planning.plan(targets, intent)
    accepted = [row for row in rows if row.accepted]
    by_target = {row.target.pk: row for row in accepted}
    ordered = [by_target[t.pk] for t in order_targets([row.target for row in accepted])]
    result = RolloutPlan(intent, spec, not_included=[row for row in rows if not row.accepted])
    start = 0
    for end in parse_waves(spec, len(ordered)) if ordered else []:
        result.waves.append(ordered[start:end])
        start = end
    return result


def do_start_rollout(
    rollout_plan,
    *,
    trigger,
    acting_user=None,
    selection=None,
    max_failures=None,
    max_failure_rate=None,
    bake_seconds=0,
    per_server_concurrency=None,
    now=None,
):
    """Record ``rollout_plan`` as a rollout and take its first step (``advance`` at ``now``):
    the first wave is queued. With no budget given, the first failure halts it
    (``max_failures`` 0)."""
    if max_failures is None and max_failure_rate is None:
        max_failures = 0
    revision = rollout_plan.intent.revision
    rollout = Rollout.objects.create(
        revision=revision,
        # "head" is the head(s) of now: a revision deployed while the rollout goes on is not
        # sent to the later waves (no canary ran it); the rollout halts instead (``_step``).
        heads=list(actions.current_heads()) if revision in ("head", "heads") else [],
        selection=selection or {},
        waves_spec=rollout_plan.spec,
        waves=[[row.target.pk for row in wave] for wave in rollout_plan.waves],
        max_failures=max_failures,
        max_failure_rate=max_failure_rate,
        bake_seconds=bake_seconds or 0,
        per_server_concurrency=per_server_concurrency,
        created_by=acting_user,
        trigger=trigger,
    )
    logger.info(
        "Rollout %s to %s started by %s: %s target(s) in %s wave(s)",
        rollout.pk,
        rollout.revision,
        acting_user or trigger,
        rollout_plan.size,
        len(rollout.waves),
    )
    return advance(rollout, now=now)


# --- where each target stands ---------------------------------------------------------------


def target_states(rollout):
    """{target id: (state, its latest run of the rollout or None, reason)} for every target of
    ``rollout``: one query over its runs."""
    latest = {}
    for run in MigrationRun.objects.filter(rollout=rollout).only(
        "id",
        "target_id",
        "status",
        "error",
        "error_code",
        "retryable",
        "attempt",
        "finished_at",
        "started_at",
    ):
        if run.target_id not in latest or run.pk > latest[run.target_id].pk:
            latest[run.target_id] = run
    states = {}
    recent = timezone.now() - timedelta(seconds=60)
    for target_id in rollout.target_ids:
        run = latest.get(target_id)
        note = rollout.notes.get(str(target_id))
        if note is not None:
            states[target_id] = (note["state"], run, note["reason"])
        elif run is None:
            states[target_id] = (PENDING, None, "")
        elif run.status in ACTIVE_RUN_STATUSES:
            states[target_id] = (ACTIVE, run, "")
        elif run.status in (RunStatus.SUCCEEDED, RunStatus.SKIPPED):
            states[target_id] = (DONE, run, "")
        elif run.pk <= rollout.resumed_after_run or run.error_code in (HALTED_CODE, ABORTED_CODE):
            # Failed before the last resume (it goes again), or cancelled by a halt.
            states[target_id] = (PENDING, run, "")
        elif (
            run.status == RunStatus.FAILED
            and run.retryable
            and run.attempt < settings.RUN_MAX_ATTEMPTS
            and run.finished_at
            and run.finished_at > recent
        ):
            states[target_id] = (ACTIVE, run, "")  # its retry is being queued
        else:
            states[target_id] = (FAILED, run, run.error_summary)
    return states


def failures_of(states):
    return [target_id for target_id, (state, _, _) in states.items() if state == FAILED]


def budget_spent(rollout, states):
    """Why the failure budget is spent, or "": more failures than ``max_failures``, or more
    than ``max_failure_rate`` percent of the targets sent so far (every wave started)."""
    failed = len(failures_of(states))
    if not failed:
        return ""
    if rollout.max_failures is not None and failed > rollout.max_failures:
        return f"{failed} target(s) failed, more than --max-failures {rollout.max_failures}"
    sent = sum(len(wave) for wave in rollout.waves[: rollout.current_wave + 1])
    rate = 100 * failed / max(sent, 1)
    if rollout.max_failure_rate is not None and rate > rollout.max_failure_rate:
        return (
            f"{failed} of the {sent} target(s) sent so far failed ({rate:.0f}%), more than "
            f"--max-failure-rate {rollout.max_failure_rate:g}%"
        )
    return ""


# --- the step ---------------------------------------------------------------------------------


def advance(rollout, *, now=None):
    """Move ``rollout`` on by one step, as far as it can go now; return it, reloaded.

    In a transaction that starts by writing the rollout's row (a row lock on PostgreSQL, the
    write lock on SQLite), so that two callers (two workers recording runs, the recovery loop)
    step it one after the other and never queue one target twice nor pass the per-server cap.
    Does nothing to a rollout that is halted, completed or aborted."""
    now = now or timezone.now()
    with transaction.atomic():
        taken = Rollout.objects.filter(pk=rollout.pk, status__in=ACTIVE_ROLLOUT_STATUSES).update(
            updated_at=now
        )
        if taken:
            rollout = Rollout.objects.get(pk=rollout.pk)
            _step(rollout, now)
    rollout.refresh_from_db()
    return rollout


def _step(rollout, now):
    if rollout.status == RolloutStatus.PLANNED:
        rollout.status, rollout.started_at = RolloutStatus.RUNNING, now
    while True:
        states = target_states(rollout)
        spent = budget_spent(rollout, states)
        if spent:
            _halt(rollout, states, spent, now)
            return
        if rollout.status == RolloutStatus.BAKING:
            if rollout.bake_until and now < rollout.bake_until:
                rollout.save()
                return
            rollout.status, rollout.bake_until = RolloutStatus.RUNNING, None
            rollout.current_wave += 1
            continue
        if rollout.current_wave >= len(rollout.waves):
            _finish(rollout, states, now)
            return
        wave = rollout.waves[rollout.current_wave]
        pending = [t for t in wave if states[t][0] == PENDING]
        moved = pending and _heads_moved(rollout)
        if moved:
            _halt(rollout, states, moved, now)
            return
        if pending and _queue(rollout, pending, now):
            continue  # the planner refused some: count them before going on
        if any(states[t][0] in (PENDING, ACTIVE) for t in wave):
            rollout.save()
            return
        # The wave is finished.
        if rollout.current_wave + 1 >= len(rollout.waves):
            rollout.current_wave = len(rollout.waves)
            continue
        if rollout.bake_seconds:
            rollout.status = RolloutStatus.BAKING
            rollout.bake_until = now + timedelta(seconds=rollout.bake_seconds)
            continue
        rollout.current_wave += 1


def _heads_moved(rollout):
    """Why the rollout must not queue more ("" when it may): a rollout to head whose heads on
    disk are no longer those it started with would send the next wave revisions that no canary
    and no earlier wave ran."""
    if not rollout.heads:
        return ""
    now_heads = list(actions.current_heads())
    if now_heads == rollout.heads:
        return ""
    return (
        f"the head(s) changed since the rollout started ({', '.join(rollout.heads)} -> "
        f"{', '.join(now_heads) or 'base'}): its later waves would get revisions no earlier wave "
        "ran. Abort it and start a new rollout, which begins with the canaries again"
    )


def _queue(rollout, pending, now):
    """Queue, through the planner, the ``pending`` targets (ids) of the current wave that may
    run now: inside their maintenance window, and under the per-server cap. Returns whether the
    planner refused or skipped any (noted on the rollout)."""
    targets = MigrationTarget.objects.in_bulk(pending)
    gone = [t for t in pending if t not in targets]
    for target_id in gone:
        rollout.notes[str(target_id)] = {"state": SKIPPED, "reason": "the target was deleted"}
    chosen = [targets[t] for t in pending if t in targets and in_window(targets[t], now)]
    chosen = _under_server_cap(rollout, chosen)
    if not chosen:
        return bool(gone)
    rows = planning.plan(chosen, planning.Intent.upgrade(rollout.revision, allow_downgrade=False))
    noted = bool(gone)
    for row in rows:
        if not row.accepted:
            state = FAILED if row.blocks else SKIPPED
            rollout.notes[str(row.target.pk)] = {"state": state, "reason": row.reason}
            noted = True
    dispatches = actions.do_enqueue_plan(
        rows, trigger=rollout.trigger, acting_user=rollout.created_by, rollout=rollout
    )
    for dispatch in dispatches:
        if dispatch.run is None:
            # Refused by the queue (a region no cluster serves): a failure, said.
            rollout.notes[str(dispatch.target.pk)] = {"state": FAILED, "reason": dispatch.reason}
            noted = True
    return noted


def per_server_cap(rollout):
    cap = rollout.per_server_concurrency
    return settings.ROLLOUT_PER_SERVER_CONCURRENCY if cap is None else cap


def _under_server_cap(rollout, targets):
    """The first of ``targets`` that fit under the per-server cap, counting every queued or
    running run on each server. A target whose server is not recorded yet has it read from its
    secret first (``migrator.tasks.server_of``); one whose secret cannot be read goes (its run
    fails and says why)."""
    cap = per_server_cap(rollout)
    if not cap:
        return targets
    from migrator.tasks import server_of

    for target in targets:
        if not target.server:
            server = server_of(target)
            if server:
                actions.do_record_server(target, server)
    servers = {target.server for target in targets if target.server}
    busy = {}
    for server in MigrationRun.objects.filter(
        status__in=ACTIVE_RUN_STATUSES, target__server__in=servers
    ).values_list("target__server", flat=True):
        busy[server] = busy.get(server, 0) + 1
    chosen = []
    for target in targets:
        if target.server:
            if busy.get(target.server, 0) >= cap:
                continue
            busy[target.server] = busy.get(target.server, 0) + 1
        chosen.append(target)
    return chosen


def _halt(rollout, states, why, now):
    """Stop queueing: cancel the rollout's queued runs (nothing ran on them); the running ones
    finish and are recorded."""
    cancelled = _cancel_queued(rollout, HALTED_CODE, "the rollout halted", now)
    failed = [t for t in failures_of(states)]
    names = _names(failed)
    rollout.status = RolloutStatus.HALTED
    which = f" ({', '.join(names[:20])}{' …' if len(names) > 20 else ''})" if names else ""
    rollout.note = (
        f"Halted: {why}{which}. "
        f"Nothing more is queued{f'; {cancelled} queued run(s) cancelled' if cancelled else ''}; "
        "runs already running finish and are recorded. Fix the revision (or the failing "
        f"targets) and deploy it, then `manage.py rollout resume {rollout.pk}`: the failed and "
        f"untouched targets go on. Or `manage.py rollout abort {rollout.pk}` to leave the "
        "untouched targets as they are."
    )
    rollout.finished_at = now
    rollout.save()
    logger.warning("Rollout %s halted: %s", rollout.pk, why)
    _notify_on_commit(rollout)


def _finish(rollout, states, now):
    failed = failures_of(states)
    rollout.status = RolloutStatus.COMPLETED
    rollout.finished_at = now
    rollout.note = (
        f"Completed with {len(failed)} failure(s) within the budget: {', '.join(_names(failed))}."
        if failed
        else ""
    )
    rollout.save()
    logger.info("Rollout %s completed", rollout.pk)
    _notify_on_commit(rollout)


def _cancel_queued(rollout, code, why, now):
    return MigrationRun.objects.filter(rollout=rollout, status=RunStatus.QUEUED).update(
        status=RunStatus.CANCELLED,
        finished_at=now,
        error_code=code,
        error=f"Cancelled before it started: {why} (rollout #{rollout.pk}); nothing ran.",
    )


def _names(target_ids):
    names = dict(MigrationTarget.objects.filter(pk__in=target_ids).values_list("pk", "name"))
    return [names.get(t, f"#{t}") for t in target_ids]


def do_resume_rollout(rollout, *, acting_user=None):
    """Resume a halted rollout (after the revision was fixed and deployed): its failed targets
    and the untouched ones go on, from the wave it halted in; the failures before now no longer
    count against the budget. Returns the rollout after its first step, or None when it was not
    halted."""
    with transaction.atomic():
        last = MigrationRun.objects.order_by("-pk").values_list("pk", flat=True).first() or 0
        resumed = Rollout.objects.filter(pk=rollout.pk, status=RolloutStatus.HALTED).update(
            status=RolloutStatus.RUNNING,
            resumed_after_run=last,
            notes={},
            note="",
            finished_at=None,
            updated_at=timezone.now(),
        )
    if not resumed:
        return None
    logger.info("Rollout %s resumed by %s", rollout.pk, acting_user or "an operator")
    return advance(rollout)


def do_steer_rollout(rollout, verb, *, acting_user=None):
    """``resume`` or ``abort`` ``rollout`` (the admin's buttons, the API, ``manage.py
    rollout``): (the rollout after it, None) or (None, why it was refused)."""
    if verb == "resume":
        done = do_resume_rollout(rollout, acting_user=acting_user)
        refusal = f"Rollout #{rollout.pk} is {rollout.status}: only a halted one can be resumed."
    else:
        done = do_abort_rollout(rollout, acting_user=acting_user)
        refusal = f"Rollout #{rollout.pk} is already {rollout.status}."
    return (done, None) if done is not None else (None, refusal)


def do_abort_rollout(rollout, *, acting_user=None):
    """Abort a rollout that is not finished: nothing more is queued, its queued runs are
    cancelled (nothing ran on them), the running ones finish. Untouched targets stay as they
    are. Returns the rollout, or None when it was already completed or aborted."""
    now = timezone.now()
    with transaction.atomic():
        aborted = Rollout.objects.filter(
            pk=rollout.pk, status__in=[*ACTIVE_ROLLOUT_STATUSES, RolloutStatus.HALTED]
        ).update(status=RolloutStatus.ABORTED, finished_at=now, updated_at=now)
        if not aborted:
            return None
        rollout = Rollout.objects.get(pk=rollout.pk)
        cancelled = _cancel_queued(
            rollout, ABORTED_CODE, f"aborted by {acting_user or 'an operator'}", now
        )
        rollout.note = (
            f"Aborted by {acting_user or 'an operator'}"
            + (f"; {cancelled} queued run(s) cancelled" if cancelled else "")
            + ". Untouched targets were left as they are."
        )
        rollout.save(update_fields=["note"])
        _notify_on_commit(rollout)
    logger.info("Rollout %s aborted by %s", rollout.pk, acting_user or "an operator")
    return rollout


def advance_after_run(run):
    """The hook after a run is recorded: step its rollout on. Free for a run of no rollout."""
    if run.rollout_id is None:
        return None
    return advance(Rollout(pk=run.rollout_id))


def advance_active(*, now=None):
    """Step every rollout in progress (the ``qcluster`` main process's loop): bake times end
    and windows open without a run finishing. Returns the rollouts stepped."""
    stepped = []
    for rollout in Rollout.objects.filter(status__in=ACTIVE_ROLLOUT_STATUSES).only("pk"):
        try:
            stepped.append(advance(rollout, now=now))
        except Exception:  # noqa: BLE001 - one rollout's trouble must not stop the others
            logger.exception("Could not advance rollout %s", rollout.pk)
    return stepped


# --- maintenance windows ----------------------------------------------------------------------

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def window_days(spec):
    """The weekdays (0 Monday … 6 Sunday) of ``spec``: ``sat,sun``, ``mon-fri``; empty: every
    day. Raises ValueError naming what is wrong."""
    if not (spec or "").strip():
        return set(range(7))
    days = set()
    for part in spec.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(
                f"{part!r} is not a day or a range of days: use {', '.join(DAYS)}, e.g. "
                "'sat,sun' or 'mon-fri'"
            )
        start, end = DAYS.index(first), DAYS.index(last or first)
        day = start
        while True:
            days.add(day)
            if day == end:
                break
            day = (day + 1) % 7
    return days


def window_zone(target):
    try:
        return ZoneInfo(target.window_timezone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"{target.window_timezone!r} is not a time zone: use an IANA name such as Europe/Paris"
        ) from None


def has_window(target):
    return bool(target.window_days or target.window_start or target.window_end)


def in_window(target, now):
    """Is ``now`` (aware) inside ``target``'s weekly maintenance window? True without one; a
    window that cannot be read is never open (the rollout waits, its page says why)."""
    if not has_window(target):
        return True
    try:
        days, zone = window_days(target.window_days), window_zone(target)
    except ValueError:
        return False
    local = now.astimezone(zone)
    start = target.window_start or datetime.min.time()
    end = target.window_end
    at = local.time()
    if end is None or start < end:
        return local.weekday() in days and at >= start and (end is None or at < end)
    # Across midnight: it opened today, or yesterday and has not closed yet.
    yesterday = (local.weekday() - 1) % 7
    return (local.weekday() in days and at >= start) or (yesterday in days and at < end)


# --- notifications ------------------------------------------------------------------------------


def _notify_on_commit(rollout):
    """Send the webhook once the change is committed, from a thread of its own: its retries
    never hold up a worker's next run or a web request. Not a daemon: a command that halts a
    rollout and exits still sends it."""
    if settings.ROLLOUT_WEBHOOK_URL:
        rollout_id = rollout.pk
        transaction.on_commit(
            lambda: threading.Thread(
                target=_notify_by_id, args=(rollout_id,), name=f"rollout-{rollout_id}-webhook"
            ).start()
        )


def _notify_by_id(rollout_id):
    from django.db import connections

    try:
        notify(Rollout.objects.get(pk=rollout_id))
    except Exception:  # noqa: BLE001 - a notification must never break anything
        logger.exception("Rollout %s webhook could not be sent", rollout_id)
    finally:
        connections.close_all()  # this thread's own connection


def notification(rollout):
    """The webhook's JSON body for ``rollout``: a Slack-compatible ``text`` and the facts.
    Names, counts and first lines of (redacted) errors; never a secret."""
    summary = describe(rollout)
    counts = summary["counts"]
    text = (
        f"Rollout #{rollout.pk} to {rollout.revision} {rollout.status}: "
        f"{counts[DONE]} done, {counts[FAILED]} failed, {counts[PENDING]} untouched "
        f"of {summary['targets']} target(s)."
    )
    if rollout.note:
        text += f" {rollout.note}"
    return {
        "text": text,
        "rollout": rollout.pk,
        "status": rollout.status,
        "revision": rollout.revision,
        "counts": counts,
        "failed": summary["failed"],
    }


def notify(rollout, *, sleep=time.sleep):
    """POST ``notification(rollout)`` to ``ROLLOUT_WEBHOOK_URL``, up to
    ``ROLLOUT_WEBHOOK_ATTEMPTS`` times, pausing ``ROLLOUT_WEBHOOK_BACKOFF_SECONDS`` and doubling
    it between tries. Returns whether it was received (a 2xx answer). The URL (which may hold a
    token, as Slack's do) is never logged: only its host."""
    from urllib.parse import urlsplit

    import requests

    url = settings.ROLLOUT_WEBHOOK_URL
    if not url:
        return False
    body = notification(rollout)
    host = urlsplit(url).hostname or "?"
    pause = settings.ROLLOUT_WEBHOOK_BACKOFF_SECONDS
    attempts = max(1, settings.ROLLOUT_WEBHOOK_ATTEMPTS)
    for attempt in range(1, attempts + 1):
        try:
            response = requests.post(url, json=body, timeout=5)
            if 200 <= response.status_code < 300:
                return True
            problem = f"HTTP {response.status_code}"
        except requests.RequestException as exc:
            problem = type(exc).__name__
        if attempt < attempts:
            logger.warning(
                "Rollout %s webhook to %s failed (%s); trying again in %ss",
                rollout.pk,
                host,
                problem,
                pause,
            )
            sleep(pause)
            pause *= 2
    logger.error(
        "Rollout %s webhook to %s failed %s time(s) (%s); giving up",
        rollout.pk,
        host,
        attempts,
        problem,
    )
    return False


# --- what it shows --------------------------------------------------------------------------------


def describe(rollout):
    """The rollout as plain data (``rollout show --json``, the API, the admin page, the
    webhook): each wave's targets and their state, the counts, the failures with their errors,
    the untouched targets. Two queries."""
    states = target_states(rollout)
    targets = MigrationTarget.objects.in_bulk(rollout.target_ids)
    counts = {state: 0 for state in (PENDING, ACTIVE, DONE, FAILED, SKIPPED)}
    waves = []
    failed, untouched = [], []
    now = timezone.now()
    for number, wave in enumerate(rollout.waves, 1):
        entries = []
        for target_id in wave:
            state, run, reason = states[target_id]
            counts[state] += 1
            target = targets.get(target_id)
            name = target.name if target else f"#{target_id}"
            shown = state
            if state == PENDING and target is not None and not in_window(target, now):
                shown = WAITING
            entry = {
                "target": name,
                "region": target.region if target else None,
                "provider": target.provider if target else None,
                "canary": bool(target and target.canary),
                "state": shown,
                "run": run.pk if run is not None else None,
                "reason": reason or None,
            }
            entries.append(entry)
            if state == FAILED:
                failed.append({"target": name, "run": entry["run"], "error": reason or None})
            elif state == PENDING:
                untouched.append(name)
        waves.append({"wave": number, "targets": entries})
    return {
        "id": rollout.pk,
        "status": rollout.status,
        "revision": rollout.revision,
        "waves_spec": rollout.waves_spec,
        "current_wave": min(rollout.current_wave + 1, len(rollout.waves)),
        "wave_count": len(rollout.waves),
        "targets": len(rollout.target_ids),
        "max_failures": rollout.max_failures,
        "max_failure_rate": rollout.max_failure_rate,
        "bake_seconds": rollout.bake_seconds,
        "bake_until": rollout.bake_until,
        "per_server_concurrency": per_server_cap(rollout) or None,
        "counts": counts,
        "failed": failed,
        "untouched": untouched,
        "note": rollout.note or None,
        "created_by": rollout.created_by.get_username() if rollout.created_by else None,
        "trigger": rollout.trigger,
        "selection": rollout.selection,
        "created_at": rollout.created_at,
        "started_at": rollout.started_at,
        "finished_at": rollout.finished_at,
        "waves": waves,
    }


def summary_line(rollout, counts=None):
    """One line: id, status, revision, where it is."""
    return (
        f"#{rollout.pk}  {rollout.status:<9}  to {rollout.revision}  wave "
        f"{min(rollout.current_wave + 1, len(rollout.waves))}/{len(rollout.waves)}  "
        f"{len(rollout.target_ids)} target(s)  {rollout.created_at:%Y-%m-%d %H:%M} UTC"
    )


def show_text(rollout):
    """``rollout show``: the waves, each target's state, the failures, what to do."""
    data = describe(rollout)
    counts = data["counts"]
    lines = [
        f"Rollout #{rollout.pk} to {rollout.revision}: {rollout.status}",
        f"Waves {rollout.waves_spec} -> {data['wave_count']} wave(s); at wave "
        f"{data['current_wave']}/{data['wave_count']}",
        "Budget: "
        + ", ".join(
            part
            for part in (
                f"--max-failures {rollout.max_failures}"
                if rollout.max_failures is not None
                else "",
                f"--max-failure-rate {rollout.max_failure_rate:g}%"
                if rollout.max_failure_rate is not None
                else "",
            )
            if part
        )
        + (f"; bake {rollout.bake_seconds}s" if rollout.bake_seconds else "")
        + (
            f"; at most {data['per_server_concurrency']} per server"
            if data["per_server_concurrency"]
            else ""
        ),
        f"{counts[DONE]} done, {counts[ACTIVE]} under way, {counts[FAILED]} failed, "
        f"{counts[PENDING]} untouched, {counts[SKIPPED]} skipped",
    ]
    if rollout.status == RolloutStatus.BAKING and rollout.bake_until:
        lines.append(f"Baking until {rollout.bake_until:%H:%M:%S} UTC")
    for wave in data["waves"]:
        lines.append(f"Wave {wave['wave']}:")
        for entry in wave["targets"]:
            run = f" run #{entry['run']}" if entry["run"] else ""
            reason = f": {entry['reason']}" if entry["reason"] else ""
            lines.append(f"  {entry['target']:<24} {entry['state']:<8}{run}{reason}")
    if data["failed"]:
        lines.append("Failed: " + ", ".join(f["target"] for f in data["failed"]))
    if rollout.status in (RolloutStatus.HALTED, RolloutStatus.ABORTED) and data["untouched"]:
        lines.append("Untouched: " + ", ".join(data["untouched"][:50]))
    if rollout.note:
        lines.append(rollout.note)
    return "\n".join(lines)
