"""The fleet dashboard: where every target stands, what runs now, what failed last.

Every number is aggregated in SQL (a handful of GROUP BY queries), so the page costs the same
with ten tenants or ten thousand. It refreshes itself while runs are queued or running.
"""

from django.contrib.admin.views.decorators import staff_member_required
from django.db.models import Count, Q
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.http import urlencode

from tenants.models import (
    ACTIVE_RUN_STATUSES,
    FINISHED_RUN_STATUSES,
    MigrationRun,
    MigrationTarget,
    RunStatus,
    TargetStatus,
)

RECENT_FAILURES = 10
ACTIVE_RUNS_SHOWN = 50


def _targets_url(**filters):
    return reverse("admin:tenants_migrationtarget_changelist") + "?" + urlencode(filters)


def _head():
    """The head revision(s) of the script directory, or () when it cannot be read."""
    try:
        from migrator import runner

        return tuple(runner.heads())
    except Exception:  # noqa: BLE001 - the dashboard still shows everything else
        return ()


@staff_member_required
def fleet_dashboard(request):
    heads = _head()
    total = MigrationTarget.objects.count()

    by_status = {
        row["status"]: row["n"]
        for row in MigrationTarget.objects.values("status").annotate(n=Count("id"))
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
        MigrationTarget.objects.values("revision")
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

    by_provider_region = list(
        MigrationTarget.objects.values("provider", "region")
        .annotate(
            n=Count("id"),
            failed=Count("id", filter=Q(status=TargetStatus.FAILED)),
            behind=Count("id", filter=Q(status=TargetStatus.BEHIND)),
        )
        .order_by("region", "provider")
    )
    for row in by_provider_region:
        row["url"] = _targets_url(provider__exact=row["provider"], region__exact=row["region"])

    active_runs = list(
        MigrationRun.objects.filter(status__in=ACTIVE_RUN_STATUSES)
        .select_related("target", "triggered_by")
        .order_by("created_at")[:ACTIVE_RUNS_SHOWN]
    )
    active_count = MigrationRun.objects.filter(status__in=ACTIVE_RUN_STATUSES).count()
    active_batches = set(
        MigrationRun.objects.filter(status__in=ACTIVE_RUN_STATUSES, batch__isnull=False)
        .values_list("batch", flat=True)
        .distinct()[:20]
    )
    batches = list(
        MigrationRun.objects.filter(batch__in=active_batches)
        .values("batch", "trigger")
        .annotate(
            total=Count("id"),
            done=Count("id", filter=Q(status__in=FINISHED_RUN_STATUSES)),
            failed=Count("id", filter=Q(status__in=[RunStatus.FAILED, RunStatus.INTERRUPTED])),
        )
        .order_by("batch")
    )
    for batch in batches:
        batch["percent"] = round(100 * batch["done"] / batch["total"]) if batch["total"] else 100

    failures = list(
        MigrationRun.objects.filter(status__in=[RunStatus.FAILED, RunStatus.INTERRUPTED])
        .select_related("target")
        .order_by("-finished_at", "-id")[:RECENT_FAILURES]
    )

    context = {
        **_admin_context(request),
        "title": "Fleet",
        "total": total,
        "heads": heads,
        "statuses": statuses,
        "revisions": revisions,
        "by_provider_region": by_provider_region,
        "active_runs": active_runs,
        "active_count": active_count,
        "batches": batches,
        "failures": failures,
        "refresh": active_count > 0,
        "runs_url": reverse("admin:tenants_migrationrun_changelist"),
    }
    return TemplateResponse(request, "admin/tenants/fleet.html", context)


def _admin_context(request):
    from django.contrib import admin

    return admin.site.each_context(request)
