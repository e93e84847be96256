"""Readiness: the control plane's database answers and the shared database(s) are at head.

Built on django-health-check: ``/readyz`` runs its database check and ``DatabaseMigrations``;
the JSON form (``Accept: application/json`` or ``?format=json``) adds the fleet's counts.
"""

import dataclasses

from django.db.models import Count
from health_check.base import HealthCheck
from health_check.exceptions import ServiceUnavailable
from health_check.views import HealthCheckView

from tenants.models import MigrationTarget, Strategy, TargetStatus


@dataclasses.dataclass
class DatabaseMigrations(HealthCheck):
    """Unavailable while a shared database is not at head.

    Reads only the control plane's record (what the last runs found): a readiness probe must not
    open a connection to every tenant database. Failed or behind dedicated targets do not make
    the control plane unready; they are counted in the JSON response.
    """

    def run(self):
        not_ready = [
            f"{name} ({status})"
            for name, status in MigrationTarget.objects.filter(kind=Strategy.SHARED)
            .exclude(status=TargetStatus.UP_TO_DATE)
            .values_list("name", "status")
        ]
        if not_ready:
            raise ServiceUnavailable("Shared database(s) not at head: " + ", ".join(not_ready))


def fleet_counts():
    counts = dict.fromkeys(TargetStatus.values, 0)
    for row in MigrationTarget.objects.values("status").annotate(n=Count("id")):
        counts[row["status"]] = row["n"]
    return counts


class ReadinessView(HealthCheckView):
    checks = ("health_check.checks.Database", "tenants.health.DatabaseMigrations")

    async def get(self, request, *args, **kwargs):
        from asgiref.sync import sync_to_async

        try:
            self.counts = await sync_to_async(fleet_counts)()
        except Exception:  # noqa: BLE001 - the database check reports the cause
            self.counts = None
        return await super().get(request, *args, **kwargs)

    def render_to_response_json(self, status):
        from django.http import JsonResponse

        payload = {
            "status": "ok" if status == 200 else "unavailable",
            "checks": {
                type(result.check).__name__: "OK" if not result.error else str(result.error)
                for result in self.results
            },
        }
        if self.counts is not None:
            payload["targets"] = self.counts
        return JsonResponse(payload, status=status)
