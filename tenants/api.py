"""The HTTP trigger of the original design (``POST migrate/{tenantId}``) and run status.

Authenticated with API tokens (``Authorization: Bearer TOKEN``), which django-rest-knox stores
as digests only: made in the admin (*API tokens*) or with ``manage.py create_api_token USERNAME``,
shown once. Checked against the ``tenants.run_migrations`` permission.
"""

from django.shortcuts import get_object_or_404
from django.urls import reverse
from rest_framework import permissions, status
from rest_framework.response import Response
from rest_framework.views import APIView

from tenants import actions
from tenants.authentication import BearerTokenAuthentication
from tenants.models import MigrationRun, Tenant, Trigger


class CanRunMigrations(permissions.BasePermission):
    message = "You need the 'tenants.run_migrations' permission (Can run tenant migrations)."

    def has_permission(self, request, view):
        return bool(request.user and request.user.has_perm("tenants.run_migrations"))


class ApiView(APIView):
    authentication_classes = [BearerTokenAuthentication]
    permission_classes = [permissions.IsAuthenticated, CanRunMigrations]


def run_as_json(run, request):
    return {
        "id": run.pk,
        "url": request.build_absolute_uri(reverse("api-run", args=[run.pk])),
        **run.outcome(),
        "triggered_by": run.triggered_by.get_username() if run.triggered_by else None,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
    }


class MigrateTenantView(ApiView):
    """``POST /api/tenants/<id>/migrate`` -> 202 with the run (a new one, or the one under way)."""

    def post(self, request, tenant_id):
        tenant = get_object_or_404(Tenant.objects.select_related("target"), pk=tenant_id)
        revision = str(request.data.get("revision") or "head") if request.data else "head"
        [dispatch] = actions.do_enqueue_runs(
            [tenant.target], trigger=Trigger.API, acting_user=request.user, revision=revision
        )
        if dispatch.run is None:
            return Response(
                {"detail": dispatch.message, "target": tenant.target.name},
                status=status.HTTP_409_CONFLICT,
            )
        body = run_as_json(dispatch.run, request)
        body["created"] = dispatch.created
        if dispatch.unqueued:
            # Recorded as failed, not queued: nothing ran, and a second POST starts a new run.
            body["detail"] = dispatch.message
            return Response(body, status=status.HTTP_503_SERVICE_UNAVAILABLE)
        return Response(body, status=status.HTTP_202_ACCEPTED)


class RunView(ApiView):
    """``GET /api/runs/<id>`` -> the run's state."""

    def get(self, request, run_id):
        run = get_object_or_404(
            MigrationRun.objects.select_related("target", "triggered_by"), pk=run_id
        )
        return Response(run_as_json(run, request))
