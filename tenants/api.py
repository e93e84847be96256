"""The HTTP trigger of the original design (``POST migrate/{tenantId}``) and run status.

Authenticated with API tokens (``Authorization: Bearer TOKEN``), which django-rest-knox stores
as digests only: made in the admin (*API tokens*) or with ``manage.py create_api_token USERNAME``,
shown once. Checked against the ``tenants.run_migrations`` permission.
"""

from django.core.exceptions import ValidationError as DjangoValidationError
from django.shortcuts import get_object_or_404
from django.urls import reverse
from rest_framework import exceptions, permissions, serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from controlplane.throttling import AnonThrottle, UserThrottle
from tenants import actions, planning
from tenants.authentication import BearerTokenAuthentication
from tenants.models import MigrationRun, Tenant, Trigger, slug_validator


class CanRunMigrations(permissions.BasePermission):
    message = "You need the 'tenants.run_migrations' permission (Can run tenant migrations)."

    def has_permission(self, request, view):
        return bool(request.user and request.user.has_perm("tenants.run_migrations"))


class ApiView(APIView):
    authentication_classes = [BearerTokenAuthentication]
    permission_classes = [permissions.IsAuthenticated, CanRunMigrations]
    throttle_classes = [AnonThrottle, UserThrottle]

    def initial(self, request, *args, **kwargs):
        try:
            super().initial(request, *args, **kwargs)
        except (exceptions.NotAuthenticated, exceptions.AuthenticationFailed):
            # DRF counts requests only once authenticated and allowed: a caller guessing tokens
            # would get 401s for ever. Count them against API_THROTTLE_ANON (429 when over).
            self.check_throttles(request)
            raise


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


class MigrateRequest(serializers.Serializer):
    """The optional body: ``{"revision": "...", "allow_downgrade": true}`` (default ``head``,
    no downgrade). A body that is not an object, a revision that is not a string, longer than a
    run records or with a NUL byte is a 400 naming the field."""

    revision = serializers.CharField(
        max_length=64, required=False, allow_blank=True, allow_null=True
    )
    allow_downgrade = serializers.BooleanField(required=False, default=False)


def tenant_or_404(tenant_id):
    """The tenant, 404 when there is none, 400 when ``tenant_id`` cannot be a tenant id."""
    try:
        slug_validator(tenant_id)
    except DjangoValidationError as exc:
        raise ValidationError(
            {"tenant": f"{tenant_id!r} is not a tenant id: {exc.messages[0]}"}
        ) from None
    return get_object_or_404(Tenant.objects.select_related("target"), pk=tenant_id)


class MigrateTenantView(ApiView):
    """``POST /api/tenants/<id>/migrate``: migrate the tenant's database.

    Body (JSON, optional): ``{"revision": "head"}`` (a revision id, ``head``, or a relative one
    such as ``+1``) and ``"allow_downgrade": true`` to let a revision below where the database
    stands downgrade it. Answers 202 with the run (a new one, ``created`` true, or the one
    already under way with the same aim, ``created`` false and a ``reason``), or 409 with
    ``status`` ``refused`` (or ``not-queued``) and a ``reason`` when nothing was queued: the
    planner refused it (held target, unknown revision, a downgrade not allowed or impossible)
    or another run of the target is under way with another aim. A malformed body or tenant id
    is a 400 naming the field (``MigrateRequest``, ``tenant_or_404``).
    """

    def post(self, request, tenant_id):
        tenant = tenant_or_404(tenant_id)
        form = MigrateRequest(data=request.data)
        form.is_valid(raise_exception=True)
        revision = form.validated_data.get("revision") or "head"
        intent = planning.Intent.upgrade(
            revision, allow_downgrade=form.validated_data["allow_downgrade"]
        )
        [row] = planning.plan([tenant.target], intent)
        if not row.accepted:
            return Response(
                {
                    "status": "refused" if row.refusal else "not-queued",
                    "target": tenant.target.name,
                    "reason": row.reason,
                    "detail": f"Not queued for {tenant.target.name}: {row.reason}.",
                    "plan": row.as_dict(),
                },
                status=status.HTTP_409_CONFLICT,
            )
        [dispatch] = actions.do_enqueue_plan([row], trigger=Trigger.API, acting_user=request.user)
        if dispatch.unqueued:
            # Recorded as failed, not queued: nothing ran, and a second POST starts a new run.
            body = run_as_json(dispatch.run, request)
            body.update(created=True, detail=dispatch.message, reason=dispatch.message)
            return Response(body, status=status.HTTP_503_SERVICE_UNAVAILABLE)
        if not dispatch.carried_out:
            body = {
                "status": "not-queued",
                "target": tenant.target.name,
                "reason": dispatch.message,
                "detail": dispatch.message,
            }
            if dispatch.run is not None:
                body["run"] = run_as_json(dispatch.run, request)
            return Response(body, status=status.HTTP_409_CONFLICT)
        body = run_as_json(dispatch.run, request)
        body["created"] = dispatch.created
        body["reason"] = None if dispatch.created else dispatch.message
        return Response(body, status=status.HTTP_202_ACCEPTED)


class RunView(ApiView):
    """``GET /api/runs/<id>`` -> the run's state."""

    def get(self, request, run_id):
        run = get_object_or_404(
            MigrationRun.objects.select_related("target", "triggered_by"), pk=run_id
        )
        return Response(run_as_json(run, request))


class CancelRunView(ApiView):
    """``POST /api/runs/<id>/cancel`` -> 200 with the cancelled run; 409 when it is not queued
    (a running run holds its target's lock and cannot be cancelled; a finished one is done)."""

    def post(self, request, run_id):
        run = get_object_or_404(
            MigrationRun.objects.select_related("target", "triggered_by"), pk=run_id
        )
        if actions.do_cancel_run(run, acting_user=request.user):
            return Response(run_as_json(run, request))
        body = run_as_json(run, request)
        body["detail"] = f"Run #{run.pk} is {run.status}: only a queued run can be cancelled" + (
            " (a running run holds its target's lock and ends by itself)." if run.is_active else "."
        )
        return Response(body, status=status.HTTP_409_CONFLICT)
