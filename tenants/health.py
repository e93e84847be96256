"""Readiness: the control plane's database answers and the shared database(s) are at head.

Built on django-health-check: ``/readyz`` runs its database check and ``DatabaseMigrations``;
the JSON form (``Accept: application/json`` or ``?format=json``) adds the fleet's counts. Anybody
gets the status and the counts; which databases are not ready only a staff session or an API
token sees.
"""

import dataclasses

from django.db.models import Count
from health_check.base import HealthCheck
from health_check.exceptions import ServiceUnavailable
from health_check.views import HealthCheckView
from rest_framework.exceptions import AuthenticationFailed

from tenants.authentication import BearerTokenAuthentication
from tenants.models import MigrationTarget, Strategy, TargetStatus


@dataclasses.dataclass
class DatabaseMigrations(HealthCheck):
    """Unavailable while a shared database is not at head.

    Reads only the control plane's record (what the last runs found): a readiness probe must not
    open a connection to every tenant database. Failed or behind dedicated targets do not make
    the control plane unready; they are counted in the JSON response. ``names``: say which
    databases (for a staff user or an API token), else only how many.
    """

    names: bool = dataclasses.field(default=False, repr=False)

    def run(self):
        from tenants.actions import reconcile_with_current_heads

        reconcile_with_current_heads()  # a revision deployed since: the shared ones are behind
        not_ready = [
            f"{name} ({status})"
            for name, status in MigrationTarget.objects.filter(
                kind=Strategy.SHARED, decommissioned_at=None
            )
            .exclude(status=TargetStatus.UP_TO_DATE)
            .values_list("name", "status")
        ]
        if not_ready and self.names:
            raise ServiceUnavailable("Shared database(s) not at head: " + ", ".join(not_ready))
        if not_ready:
            raise ServiceUnavailable(
                f"{len(not_ready)} shared database(s) not at head (which: with an API token or "
                "a staff login)."
            )


def may_see_names(request):
    """A staff user's session, or ``Authorization: Bearer`` with a valid API token."""
    user = getattr(request, "user", None)
    if user is not None and user.is_active and user.is_staff:
        return True
    try:
        return BearerTokenAuthentication().authenticate(request) is not None
    except AuthenticationFailed:
        return False


def fleet_counts():
    from tenants.actions import reconcile_with_current_heads

    reconcile_with_current_heads()  # counted as the revisions on disk now make them
    counts = dict.fromkeys(TargetStatus.values, 0)
    for row in MigrationTarget.objects.active().values("status").annotate(n=Count("id")):
        counts[row["status"]] = row["n"]
    return counts


class ReadinessView(HealthCheckView):
    checks = ("health_check.checks.Database", "tenants.health.DatabaseMigrations")

    async def get(self, request, *args, **kwargs):
        from asgiref.sync import sync_to_async

        try:
            self.counts = await sync_to_async(fleet_counts)()
            self.names = await sync_to_async(may_see_names)(request)
        except Exception:  # noqa: BLE001 - the database check reports the cause
            self.counts, self.names = None, False
        return await super().get(request, *args, **kwargs)

    def get_checks(self):
        for check in super().get_checks():
            if isinstance(check, DatabaseMigrations):
                check.names = self.names
            yield check

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
