"""The fleet dashboard: where every target stands, what runs now, what failed last.

Every number is aggregated in SQL (a handful of GROUP BY queries), so the page costs the same
with ten tenants or ten thousand. It refreshes itself while runs are queued or running (or a
target is migrating).
"""

from datetime import timedelta

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.db.models import Count, Max, Min, OuterRef, Q, Subquery
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.http import urlencode

from tenants.models import (
    ACTIVE_RUN_STATUSES,
    FINISHED_RUN_STATUSES,
    QUEUED_WARNING_SECONDS,
    MigrationRun,
    MigrationTarget,
    Provider,
    Rollout,
    RolloutStatus,
    RunStatus,
    TargetStatus,
    Trigger,
)

RECENT_FAILURES = 10
ACTIVE_RUNS_SHOWN = 50
ACTIVE_BATCHES_SHOWN = 20
FINGERPRINT_GROUPS_SHOWN = 30


def _targets_url(**filters):
    return reverse("admin:tenants_migrationtarget_changelist") + "?" + urlencode(filters)


def _head():
    """(the head revision(s) of the script directory, or () when it cannot be read; why not)."""
    from migrator.exceptions import MigratorError

    try:
        from tenants.actions import current_heads

        return tuple(current_heads()), ""
    except MigratorError as exc:  # a revision that cannot be imported: said on the page
        return (), str(exc)
    except Exception:  # noqa: BLE001 - the dashboard still shows everything else
        return (), ""


def _phase_labels():
    """{head revision: "expand" or "contract"} for the blue/green branches' heads, or {}."""
    try:
        from migrator import phases

        return {revision: label for label, revision in phases.branch_heads().items()}
    except Exception:  # noqa: BLE001 - the heads alone, as read
        return {}


@staff_member_required
def fleet_dashboard(request):
    heads, script_error = _head()
    labels = _phase_labels() if len(heads) > 1 else {}
    total = MigrationTarget.objects.active().count()

    by_status = {
        row["status"]: row["n"]
        for row in MigrationTarget.objects.active().values("status").annotate(n=Count("id"))
    }
    statuses = [
        {
            "value": value,
            "label": label,
            "count": by_status.get(value, 0),
            "url": _targets_url(status__exact=value),
        }
        for value, label in TargetStatus.choices
    ]

    revisions = []
    top = 1
    for row in (
        MigrationTarget.objects.active()
        .values("revision")
        .annotate(n=Count("id"))
        .order_by("-n", "revision")
    ):
        top = max(top, row["n"])
        revisions.append(
            {
                "revision": row["revision"] or "(none recorded)",
                "count": row["n"],
                "is_head": row["revision"] in heads,
                "url": _targets_url(revision=row["revision"]),
            }
        )
    for entry in revisions:
        entry["percent"] = round(100 * entry["count"] / top)
    phase_counts = _phase_counts(revisions)

    by_provider_region = list(
        MigrationTarget.objects.active()
        .values("provider", "region")
        .annotate(
            n=Count("id"),
            failed=Count("id", filter=Q(status=TargetStatus.FAILED)),
            behind=Count("id", filter=Q(status=TargetStatus.BEHIND)),
        )
        .order_by("region", "provider")
    )
    provider_labels = dict(Provider.choices)
    for row in by_provider_region:
        row["provider_label"] = provider_labels.get(row["provider"], row["provider"])
        row["url"] = _targets_url(provider__exact=row["provider"], region__exact=row["region"])

    # Targets at one revision share one schema fingerprint per provider: another fingerprint,
    # or a drifted target, stands out. Groups with drift first.
    fingerprints = list(
        MigrationTarget.objects.active()
        .values("revision", "provider", "schema_fingerprint")
        .annotate(n=Count("id"), drifted_n=Count("id", filter=Q(drifted=True)))
        .order_by("-drifted_n", "revision", "provider", "-n")[:FINGERPRINT_GROUPS_SHOWN]
    )
    for row in fingerprints:
        row["provider_label"] = provider_labels.get(row["provider"], row["provider"])
        row["fingerprint"] = row["schema_fingerprint"][:12]
        filters = {"revision": row["revision"], "provider__exact": row["provider"]}
        if row["drifted_n"]:
            filters["drifted__exact"] = "1"
        row["url"] = _targets_url(**filters)

    active_runs = list(
        MigrationRun.objects.filter(status__in=ACTIVE_RUN_STATUSES)
        .select_related("target", "triggered_by")
        .order_by("created_at")[:ACTIVE_RUNS_SHOWN]
    )
    # Queued runs no worker took for a minute (a retry counts from when it is due): the same
    # statement as the count of active runs.
    cutoff = timezone.now() - timedelta(seconds=QUEUED_WARNING_SECONDS)
    waiting = Q(status=RunStatus.QUEUED) & (
        Q(not_before__isnull=True, created_at__lt=cutoff) | Q(not_before__lt=cutoff)
    )
    counts = MigrationRun.objects.filter(status__in=ACTIVE_RUN_STATUSES).aggregate(
        active=Count("id"),
        waiting=Count("id", filter=waiting),
        waiting_since=Min("created_at", filter=waiting),
    )
    active_count = counts["active"]
    # The batches with runs under way, newest first. Ordered explicitly: with the model's
    # default ordering, DISTINCT would also cover created_at and return one batch many times.
    active_batches = list(
        MigrationRun.objects.filter(status__in=ACTIVE_RUN_STATUSES, batch__isnull=False)
        .values("batch")
        .annotate(started=Min("created_at"))
        .order_by("-started")
        .values_list("batch", flat=True)[:ACTIVE_BATCHES_SHOWN]
    )
    # Progress counts targets, not runs: a retry of a failed attempt is a newer run of the same
    # target in the same batch, and only each target's latest run in the batch says where it is.
    # (The latest as the highest id per batch and target: a NOT EXISTS of a later one was planned
    # as a nested loop over the batch's runs for each of them when PostgreSQL had no statistics
    # yet for a batch just queued: 10 s for 10,000 runs, until autovacuum analysed the table.)
    latest = (
        MigrationRun.objects.filter(batch__in=active_batches)
        .order_by()
        .values("batch", "target")
        .annotate(last=Max("pk"))
        .values("last")
    )
    batches = list(
        MigrationRun.objects.filter(pk__in=Subquery(latest))
        .values("batch")
        .annotate(
            trigger=Min("trigger"),
            started=Min("created_at"),
            total=Count("id"),
            done=Count("id", filter=Q(status__in=FINISHED_RUN_STATUSES)),
            failed=Count("id", filter=Q(status__in=[RunStatus.FAILED, RunStatus.INTERRUPTED])),
        )
        .order_by("-started")
    )
    trigger_labels = dict(Trigger.choices)
    for batch in batches:
        size = batch["total"] or 1
        batch["trigger_label"] = trigger_labels.get(batch["trigger"], batch["trigger"])
        batch["percent"] = round(100 * batch["done"] / size)
        batch["failed_percent"] = round(100 * batch["failed"] / size)
        batch["ok_percent"] = batch["percent"] - batch["failed_percent"]

    # A failure that a later run of the same target put right says so: the list then does not
    # read as more failing targets than the Failed count.
    put_right = MigrationRun.objects.filter(
        target=OuterRef("target"),
        pk__gt=OuterRef("pk"),
        status__in=[RunStatus.SUCCEEDED, RunStatus.SKIPPED],
    ).order_by("pk")
    failures = list(
        MigrationRun.objects.filter(status__in=[RunStatus.FAILED, RunStatus.INTERRUPTED])
        .select_related("target")
        .annotate(put_right_by=Subquery(put_right.values("pk")[:1]))
        .order_by("-finished_at", "-id")[:RECENT_FAILURES]
    )

    rollouts = _rollouts()

    context = {
        **_admin_context(request),
        "rollouts": rollouts,
        "title": "Fleet",
        "total": total,
        "heads": heads,
        # Each head with the branch it ends: "0005_x (expand)".
        "heads_named": [f"{h} ({labels[h]})" if h in labels else h for h in heads],
        "heads_are_phases": len(heads) > 1 and all(h in labels for h in heads),
        "script_error": script_error,
        "statuses": statuses,
        "revisions": revisions,
        "phase_counts": phase_counts,
        "by_provider_region": by_provider_region,
        "fingerprints": fingerprints,
        # Groups with drift come first: only when every group shown has drift can there be more
        # drifted targets than these ("12+ drifted").
        "drifted_total": sum(row["drifted_n"] for row in fingerprints),
        "drifted_more": len(fingerprints) >= FINGERPRINT_GROUPS_SHOWN
        and fingerprints[-1]["drifted_n"] > 0,
        "active_runs": active_runs,
        "active_count": active_count,
        "waiting_count": counts["waiting"],
        "waiting_since": counts["waiting_since"],
        "queued_timeout": settings.RUN_QUEUED_TIMEOUT_SECONDS,
        "batches": batches,
        "failures": failures,
        # The counts come from separate statements: a run that finishes between them can leave
        # a target shown as migrating with nothing in progress. Refreshing while either says
        # "under way" means the page never settles on such a half-updated picture.
        "refresh": active_count > 0
        or by_status.get(TargetStatus.MIGRATING, 0) > 0
        or any(r.is_active for r in rollouts),
        "runs_url": reverse("admin:tenants_migrationrun_changelist"),
    }
    return TemplateResponse(request, "admin/tenants/fleet.html", context)


ROLLOUTS_SHOWN = 10


def _rollouts():
    """The rollouts in progress and the halted ones, halted first, each with its targets
    counted by where they stand, as ``rollout show`` counts them: by each target's latest run of
    the rollout (a target that failed, was resumed and failed again is one failure, not two; one
    that failed, then succeeded, is done), a failure before the last resume or a run cancelled by
    a halt counting as untouched. Two queries (one when there are none)."""
    from django.db.models import Case, F, IntegerField, Max, Value, When

    from tenants.rollouts import ABORTED_CODE, HALTED_CODE

    found = list(
        Rollout.objects.filter(
            status__in=[
                RolloutStatus.HALTED,
                RolloutStatus.PLANNED,
                RolloutStatus.RUNNING,
                RolloutStatus.BAKING,
            ]
        )
        .annotate(
            halted_first=Case(
                When(status=RolloutStatus.HALTED, then=Value(0)),
                default=Value(1),
                output_field=IntegerField(),
            )
        )
        .order_by("halted_first", "-created_at")[:ROLLOUTS_SHOWN]
    )
    if not found:
        return []
    latest = (
        MigrationRun.objects.filter(rollout__in=found)
        .values("rollout", "target")
        .annotate(last=Max("id"))
        .values("last")
    )
    counts = {
        row["rollout"]: row
        for row in MigrationRun.objects.filter(pk__in=latest)
        .values("rollout")
        .annotate(
            done=Count("id", filter=Q(status__in=[RunStatus.SUCCEEDED, RunStatus.SKIPPED])),
            failed=Count(
                "id",
                filter=Q(status__in=[RunStatus.FAILED, RunStatus.INTERRUPTED])
                & Q(id__gt=F("rollout__resumed_after_run"))
                & ~Q(error_code__in=[HALTED_CODE, ABORTED_CODE]),
            ),
            active=Count("id", filter=Q(status__in=ACTIVE_RUN_STATUSES)),
        )
        .order_by()
    }
    for rollout in found:
        row = counts.get(rollout.pk, {})
        rollout.done, rollout.failed, rollout.active = (
            row.get("done", 0),
            row.get("failed", 0),
            row.get("active", 0),
        )
        rollout.total = len(rollout.target_ids)
        rollout.wave_label = (
            f"{min(rollout.current_wave + 1, len(rollout.waves))}/{len(rollout.waves)}"
        )
        rollout.url = reverse("admin:tenants_rollout_change", args=[rollout.pk])
    return found


def _admin_context(request):
    from django.contrib import admin

    return admin.site.each_context(request)


def _phase_counts(revisions):
    """Targets before expand, expanded and contracted, from the per-revision counts (no query);
    None when the script directory has no expand/contract branches."""
    try:
        from migrator import phases

        if not phases.has_phases():
            return None
        counts = {"before expand": 0, "expanded": 0, "contracted": 0}
        for entry in revisions:
            revision = "" if entry["revision"] == "(none recorded)" else entry["revision"]
            counts[phases.state(revision).label] += entry["count"]
        return counts
    except Exception:  # noqa: BLE001 - the dashboard still shows everything else
        return None
