"""The HTTP trigger of the original design (``POST migrate/{tenantId}``) and run status.

Authenticated with API tokens (``Authorization: Bearer TOKEN``), which django-rest-knox stores
as digests only: made in the admin (*API tokens*) or with ``manage.py create_api_token USERNAME``,
shown once. Checked against the ``tenants.run_migrations`` permission.
"""

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db.models import Count, Q
from django.shortcuts import get_object_or_404
from django.urls import reverse
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, extend_schema_field
from rest_framework import exceptions, permissions, serializers, status
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination
from rest_framework.response import Response
from rest_framework.views import APIView

from controlplane.throttling import AnonThrottle, UserThrottle
from tenants import actions, planning
from tenants.authentication import BearerTokenAuthentication
from tenants.models import (
    DEFAULT_REGION,
    MigrationRun,
    MigrationTarget,
    Provider,
    Strategy,
    TargetStatus,
    Tenant,
    Trigger,
    slug_validator,
    vault_path_validator,
)
from tenants.registration import (
    ACTIVE,
    CONFLICT,
    CREATED,
    DECOMMISSIONED,
    INVALID,
    EventSerializer,
    LowerChoiceField,
    conflict_message,
    do_register_tenants,
    event_of,
    validate_events,
)


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


def _check_slug(value, field, what):
    """400 naming ``field`` when ``value`` cannot be a ``what`` (before any query: PostgreSQL
    refuses NUL bytes)."""
    try:
        slug_validator(value)
    except DjangoValidationError as exc:
        raise ValidationError({field: f"{value!r} is not {what}: {exc.messages[0]}"}) from None


def tenant_or_404(tenant_id):
    """The tenant, 404 when there is none, 400 when ``tenant_id`` cannot be a tenant id."""
    _check_slug(tenant_id, "tenant", "a tenant id")
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

    @extend_schema(
        request=MigrateRequest,
        responses={202: OpenApiTypes.OBJECT, 409: OpenApiTypes.OBJECT, 503: OpenApiTypes.OBJECT},
    )
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

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request, run_id):
        run = get_object_or_404(
            MigrationRun.objects.select_related("target", "triggered_by"), pk=run_id
        )
        return Response(run_as_json(run, request))


class CancelRunView(ApiView):
    """``POST /api/runs/<id>/cancel`` -> 200 with the cancelled run; 409 when it is not queued
    (a running run holds its target's lock and cannot be cancelled; a finished one is done)."""

    @extend_schema(request=None, responses={200: OpenApiTypes.OBJECT, 409: OpenApiTypes.OBJECT})
    def post(self, request, run_id):
        run = get_object_or_404(
            MigrationRun.objects.select_related("target", "triggered_by"), pk=run_id
        )
        if actions.do_cancel_run(run, acting_user=request.user):
            return Response(run_as_json(run, request))
        body = run_as_json(run, request)
        state = "is running" if run.is_active else f"has already ended ({run.status})"
        body["detail"] = f"Run #{run.pk} {state}: only a queued run can be cancelled" + (
            " (a running run holds its target's lock and ends by itself)." if run.is_active else "."
        )
        return Response(body, status=status.HTTP_409_CONFLICT)


# --- Registering tenants and targets (issue 20) ------------------------------------------------


class CanRegisterTenants(permissions.BasePermission):
    """Writes need ``tenants.register_tenants``; reads it or ``tenants.run_migrations``."""

    message = "You need the 'tenants.register_tenants' permission (Can register tenants)."

    def has_permission(self, request, view):
        user = request.user
        if not user:
            return False
        if request.method in permissions.SAFE_METHODS and user.has_perm("tenants.run_migrations"):
            return True
        return user.has_perm("tenants.register_tenants")


class RegistryView(ApiView):
    permission_classes = [permissions.IsAuthenticated, CanRegisterTenants]


class Page(PageNumberPagination):
    page_size = 100
    page_size_query_param = "page_size"
    max_page_size = 1000


class TargetSerializer(serializers.ModelSerializer):
    """A migration target as the API shows it, and what a POST or PATCH may set."""

    vault_path = serializers.CharField(
        max_length=255,
        required=False,
        allow_blank=True,
        validators=[vault_path_validator],
        help_text=MigrationTarget._meta.get_field("vault_path").help_text,
    )
    decommissioned = serializers.BooleanField(read_only=True)
    tenants = serializers.SerializerMethodField()

    class Meta:
        model = MigrationTarget
        fields = [
            "name",
            "kind",
            "provider",
            "region",
            "vault_path",
            "backup_policy",
            "canary",
            "server",
            "window_days",
            "window_start",
            "window_end",
            "window_timezone",
            "status",
            "revision",
            "held",
            "drifted",
            "last_error",
            "last_migrated_at",
            "decommissioned",
            "decommissioned_at",
            "created_at",
            "tenants",
        ]
        read_only_fields = [
            "server",
            "status",
            "revision",
            "held",
            "drifted",
            "last_error",
            "last_migrated_at",
            "decommissioned_at",
            "created_at",
        ]
        # One shared database per region: said by ``validate`` in words, not DRF's "must make
        # a unique set".
        validators = []

    def validate_window_days(self, value):
        from tenants.rollouts import window_days

        try:
            window_days(value)
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        return value

    def validate_window_timezone(self, value):
        from tenants.rollouts import window_zone

        try:
            window_zone(MigrationTarget(window_timezone=value))
        except ValueError as exc:
            raise ValidationError(str(exc)) from None
        return value

    @extend_schema_field(serializers.IntegerField())
    def get_tenants(self, target):
        count = getattr(target, "tenant_count", None)
        return target.tenants.count() if count is None else count

    def validate(self, attrs):
        instance = self.instance
        for name in ("name", "kind", "region"):
            if instance is not None and name in attrs and attrs[name] != getattr(instance, name):
                raise ValidationError(
                    {name: f"{name} of target {instance.name} cannot change (a database move)."}
                )
        if instance is None and attrs.get("kind") == Strategy.SHARED:
            region = attrs.get("region", DEFAULT_REGION)
            other = MigrationTarget.objects.filter(kind=Strategy.SHARED, region=region).first()
            if other is not None:
                raise exceptions.ValidationError(
                    {"region": f"Region {region!r} already has a shared database: {other.name}."}
                )
        return attrs


class TenantSerializer(serializers.ModelSerializer):
    """A tenant as the API shows it."""

    tenant_id = serializers.CharField(source="id", read_only=True)
    database_strategy = serializers.CharField(source="strategy", read_only=True)
    database_provider = serializers.CharField(source="target.provider", read_only=True)
    target = serializers.CharField(source="target.name", read_only=True)
    vault_path = serializers.CharField(source="target.effective_vault_path", read_only=True)
    target_status = serializers.CharField(source="target.status", read_only=True)
    revision = serializers.CharField(source="target.revision", read_only=True)
    decommissioned = serializers.BooleanField(read_only=True)

    class Meta:
        model = Tenant
        fields = [
            "tenant_id",
            "name",
            "database_strategy",
            "database_provider",
            "region",
            "target",
            "vault_path",
            "target_status",
            "revision",
            "decommissioned",
            "decommissioned_at",
            "created_at",
        ]


class RegistrationResponse(serializers.Serializer):
    created = serializers.BooleanField()
    tenant = TenantSerializer()
    run = serializers.DictField(allow_null=True, help_text="The first migration's run.")
    detail = serializers.CharField()


class TenantUpdate(serializers.Serializer):
    """What PATCH /api/tenants/<id> may change: the name; for a dedicated or external tenant,
    its own database's provider and Vault path."""

    name = serializers.CharField(max_length=200, required=False)
    database_provider = LowerChoiceField(choices=Provider.values, required=False)
    vault_path = serializers.CharField(
        max_length=255, required=False, validators=[vault_path_validator]
    )


def _filter(queryset, request, filters):
    """Narrow ``queryset`` by the query parameters named in ``filters`` (parameter -> lookup,
    allowed values or None); a value not allowed is a 400 saying what is."""
    for parameter, (lookup, allowed) in filters.items():
        values = [v for v in request.query_params.getlist(parameter) if v]
        values = [part.strip() for v in values for part in v.split(",") if part.strip()]
        if not values:
            continue
        if allowed is not None:
            wrong = [v for v in values if v not in allowed]
            if wrong:
                raise ValidationError(
                    {parameter: f"{', '.join(wrong)}: use one of {', '.join(allowed)}."}
                )
        queryset = queryset.filter(**{f"{lookup}__in": values})
    return queryset


STATUS_FILTER = [ACTIVE, DECOMMISSIONED, *TargetStatus.values]


def _by_status(queryset, request, *, prefix=""):
    from tenants.actions import reconcile_with_current_heads

    reconcile_with_current_heads()
    values = [v.strip() for p in request.query_params.getlist("status") for v in p.split(",")]
    values = [v for v in values if v]
    if not values:
        return queryset
    wrong = [v for v in values if v not in STATUS_FILTER]
    if wrong:
        raise ValidationError(
            {"status": f"{', '.join(wrong)}: use one of {', '.join(STATUS_FILTER)}."}
        )
    query = Q()
    for value in values:
        if value == ACTIVE:
            query |= Q(decommissioned_at=None)
        elif value == DECOMMISSIONED:
            query |= Q(decommissioned_at__isnull=False)
        else:
            query |= Q(**{f"{prefix}status": value})
    return queryset.filter(query)


LIST_PARAMETERS = [
    OpenApiParameter("strategy", str, enum=Strategy.values, description="kind, comma-separated"),
    OpenApiParameter("provider", str, enum=Provider.values, description="comma-separated"),
    OpenApiParameter("region", str, description="comma-separated"),
    OpenApiParameter(
        "status",
        str,
        enum=STATUS_FILTER,
        description="active, decommissioned, or where the database stands; comma-separated",
    ),
]


class TenantListView(RegistryView):
    """``GET /api/tenants/``: the tenants, paginated; ``POST``: register one (the provisioning
    event)."""

    @extend_schema(parameters=LIST_PARAMETERS, responses=TenantSerializer(many=True))
    def get(self, request):
        queryset = Tenant.objects.select_related("target").order_by("id")
        queryset = _filter(
            queryset,
            request,
            {
                "strategy": ("strategy", Strategy.values),
                "provider": ("target__provider", Provider.values),
                "region": ("region", None),
            },
        )
        queryset = _by_status(queryset, request, prefix="target__")
        page = Page()
        tenants = page.paginate_queryset(queryset, request, view=self)
        return page.get_paginated_response(TenantSerializer(tenants, many=True).data)

    @extend_schema(
        request=EventSerializer,
        responses={
            201: RegistrationResponse,
            200: RegistrationResponse,
            400: OpenApiTypes.OBJECT,
            409: OpenApiTypes.OBJECT,
        },
    )
    def post(self, request):
        """Register a tenant from its provisioning event. 201 the first time (with its first
        migration's run when ``database_created`` is true), 200 for the same event again
        (nothing created), 409 saying what differs for a conflicting one, 400 naming the
        fields for an invalid one."""
        if not isinstance(request.data, dict):
            raise ValidationError({"non_field_errors": "Expected a JSON object (the event)."})
        form = EventSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        [registration] = validate_events([(None, request.data)])
        do_register_tenants(
            [registration], trigger=Trigger.API, acting_user=request.user, update=False
        )
        return registration_response(registration, request)


def registration_response(registration, request):
    outcome = registration.outcome
    if outcome == INVALID:
        return Response(
            {name: [message] for name, message in registration.errors.items()},
            status=status.HTTP_400_BAD_REQUEST,
        )
    if outcome == CONFLICT:
        return Response(
            {
                "detail": conflict_message(registration),
                "tenant_id": registration.tenant_id,
                "differences": {
                    name: {"registered": registered, "event": event}
                    for name, (registered, event) in registration.differences.items()
                },
                "errors": registration.errors,
            },
            status=status.HTTP_409_CONFLICT,
        )
    tenant = Tenant.objects.select_related("target").get(pk=registration.tenant_id)
    run = registration.run
    if run is None and registration.dispatch is None:
        run = tenant.target.runs.select_related("target", "triggered_by").first()
    if registration.dispatch is not None:
        detail = registration.dispatch.message
    elif outcome == CREATED:
        detail = f"Tenant {tenant.id} registered in {tenant.target.name}; no migration queued " + (
            "(database_created is false: send the event again with true once it exists)."
            if not registration.event.get("database_created")
            else "(its database already had runs)."
        )
    else:
        detail = f"Tenant {tenant.id} is already registered with these values; nothing changed."
    body = {
        "created": outcome == CREATED,
        "outcome": outcome,
        "tenant": TenantSerializer(tenant).data,
        "run": run_as_json(run, request) if run is not None else None,
        "detail": detail,
    }
    return Response(body, status=status.HTTP_201_CREATED if outcome == CREATED else 200)


class TenantDetailView(RegistryView):
    """``GET /api/tenants/<id>``: the tenant; ``PATCH``: change its name, or its own
    database's provider and Vault path."""

    @extend_schema(responses=TenantSerializer)
    def get(self, request, tenant_id):
        return Response(TenantSerializer(tenant_or_404(tenant_id)).data)

    @extend_schema(request=TenantUpdate, responses=TenantSerializer)
    def patch(self, request, tenant_id):
        tenant = tenant_or_404(tenant_id)
        if not isinstance(request.data, dict):
            raise ValidationError({"non_field_errors": "Expected a JSON object."})
        fixed = sorted(set(request.data) - set(TenantUpdate().fields))
        if fixed:
            raise ValidationError(
                {
                    name: [
                        f"{name} cannot be changed here: PATCH takes "
                        + ", ".join(TenantUpdate().fields)
                        + " (a new strategy or region is a database move: decommission the "
                        "tenant and register a new one)."
                    ]
                    for name in fixed
                }
            )
        form = TenantUpdate(data=request.data)
        form.is_valid(raise_exception=True)
        event = {**event_of(tenant), **form.validated_data, "database_created": False}
        [registration] = validate_events([(None, event)])
        if registration.outcome != INVALID:
            do_register_tenants(
                [registration], trigger=Trigger.API, acting_user=request.user, update=True
            )
        if registration.outcome == INVALID:
            return Response(
                {name: [message] for name, message in registration.errors.items()},
                status=status.HTTP_400_BAD_REQUEST,
            )
        tenant = Tenant.objects.select_related("target").get(pk=tenant.pk)
        return Response(TenantSerializer(tenant).data)


class TenantDecommissionView(RegistryView):
    """``POST /api/tenants/<id>/decommission``: retire the tenant (and its own database): no
    more runs, history kept. 200 with the tenant; 409 with the reason when refused."""

    @extend_schema(request=None, responses={200: TenantSerializer, 409: OpenApiTypes.OBJECT})
    def post(self, request, tenant_id):
        tenant = tenant_or_404(tenant_id)
        outcome = actions.do_decommission_tenant(tenant, acting_user=request.user)
        tenant = Tenant.objects.select_related("target").get(pk=tenant.pk)
        if not outcome.done:
            return Response(
                {"detail": outcome.refusal, "tenant": TenantSerializer(tenant).data},
                status=status.HTTP_409_CONFLICT,
            )
        return Response(TenantSerializer(tenant).data)


def _targets():
    return MigrationTarget.objects.annotate(tenant_count=Count("tenants")).order_by("name")


def target_or_404(name):
    _check_slug(name, "target", "a target name")
    return get_object_or_404(_targets(), name=name)


class TargetListView(RegistryView):
    """``GET /api/targets/``: the targets, paginated; ``POST``: create one."""

    @extend_schema(parameters=LIST_PARAMETERS, responses=TargetSerializer(many=True))
    def get(self, request):
        queryset = _filter(
            _targets(),
            request,
            {
                "strategy": ("kind", Strategy.values),
                "provider": ("provider", Provider.values),
                "region": ("region", None),
            },
        )
        queryset = _by_status(queryset, request)
        page = Page()
        targets = page.paginate_queryset(queryset, request, view=self)
        return page.get_paginated_response(TargetSerializer(targets, many=True).data)

    @extend_schema(request=TargetSerializer, responses={201: TargetSerializer})
    def post(self, request):
        form = TargetSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        target = form.save()
        return Response(TargetSerializer(target).data, status=status.HTTP_201_CREATED)


class TargetDetailView(RegistryView):
    """``GET /api/targets/<name>``: the target; ``PATCH``: its provider, Vault path or backup
    policy (its name, kind and region cannot change)."""

    @extend_schema(responses=TargetSerializer)
    def get(self, request, name):
        return Response(TargetSerializer(target_or_404(name)).data)

    @extend_schema(request=TargetSerializer, responses=TargetSerializer)
    def patch(self, request, name):
        target = target_or_404(name)
        form = TargetSerializer(target, data=request.data, partial=True)
        form.is_valid(raise_exception=True)
        form.save()
        return Response(TargetSerializer(target_or_404(name)).data)


class TargetDecommissionView(RegistryView):
    """``POST /api/targets/<name>/decommission``: retire the target: no more runs, history
    kept. 409 with the reason when refused (a run under way, tenants still in it)."""

    @extend_schema(request=None, responses={200: TargetSerializer, 409: OpenApiTypes.OBJECT})
    def post(self, request, name):
        target = target_or_404(name)
        outcome = actions.do_decommission_target(target, acting_user=request.user)
        body = TargetSerializer(target_or_404(name)).data
        if not outcome.done:
            return Response(
                {"detail": outcome.refusal, "target": body}, status=status.HTTP_409_CONFLICT
            )
        return Response(body)


class BearerTokenScheme(OpenApiAuthenticationExtension):
    """The OpenAPI schema's name for ``Authorization: Bearer TOKEN``."""

    target_class = "tenants.authentication.BearerTokenAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An API token: the admin's 'API tokens' page or "
            "`manage.py create_api_token USERNAME`.",
        }


# --- Rollouts (issue 21) -------------------------------------------------------------------------


class RolloutRequest(serializers.Serializer):
    """``POST /api/rollouts/``: which targets (scopes OR-ed, ``providers``/``regions`` narrow
    them, as ``migrate_tenants``), where to, in which waves, with which budget."""

    all = serializers.BooleanField(required=False, default=False)
    shared = serializers.BooleanField(required=False, default=False)
    tenants = serializers.ListField(child=serializers.CharField(max_length=63), required=False)
    targets = serializers.ListField(child=serializers.CharField(max_length=63), required=False)
    strategies = serializers.ListField(
        child=serializers.ChoiceField(choices=Strategy.values), required=False
    )
    providers = serializers.ListField(
        child=serializers.ChoiceField(choices=Provider.values), required=False
    )
    regions = serializers.ListField(child=serializers.CharField(max_length=63), required=False)
    failed = serializers.BooleanField(required=False, default=False)
    revision = serializers.CharField(max_length=64, required=False, default="head")
    waves = serializers.CharField(max_length=200, help_text="e.g. 1,10%,50%,100%")
    max_failures = serializers.IntegerField(min_value=0, required=False, allow_null=True)
    max_failure_rate = serializers.FloatField(
        min_value=0, max_value=100, required=False, allow_null=True
    )
    bake_seconds = serializers.IntegerField(min_value=0, required=False, default=0)
    per_server_concurrency = serializers.IntegerField(min_value=0, required=False, allow_null=True)
    dry_run = serializers.BooleanField(required=False, default=False)

    SCOPES = ("all", "shared", "tenants", "targets", "strategies", "failed", "providers", "regions")

    def validate(self, attrs):
        if not any(attrs.get(scope) for scope in self.SCOPES):
            raise ValidationError(
                {
                    "all": "Say which targets: all, shared, tenants, targets, strategies, failed, "
                    "providers or regions."
                }
            )
        from tenants.selection import missing_tenants

        unknown = missing_tenants(attrs.get("tenants", []))
        if unknown:
            # As migrate_tenants --tenant says it: a typo is not "nothing to roll out".
            raise ValidationError({"tenants": f"Unknown tenant id(s): {', '.join(unknown)}."})
        return attrs


def rollout_as_json(rollout, request):
    from tenants import rollouts

    return {
        "url": request.build_absolute_uri(reverse("api-rollout", args=[rollout.pk])),
        **rollouts.describe(rollout),
    }


class RolloutListView(ApiView):
    """``GET /api/rollouts/``: rollouts, newest first (paginated). ``POST``: start one
    (``RolloutRequest``): 201 with the rollout, its waves in order and its first wave queued;
    with ``"dry_run": true`` 200 with the plan only; 400 naming the field for bad input."""

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request):
        from tenants.models import Rollout

        paginator = Page()
        page = paginator.paginate_queryset(
            Rollout.objects.select_related("created_by").order_by("-created_at", "-id"),
            request,
            view=self,
        )
        return paginator.get_paginated_response([rollout_as_json(r, request) for r in page])

    @extend_schema(request=RolloutRequest, responses={201: OpenApiTypes.OBJECT})
    def post(self, request):
        from tenants import rollouts
        from tenants.selection import select_targets

        form = RolloutRequest(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        targets = select_targets(
            all_targets=data["all"],
            shared=data["shared"],
            tenant_ids=data.get("tenants", []),
            target_names=data.get("targets", []),
            strategies=data.get("strategies", []),
            providers=data.get("providers", []),
            regions=data.get("regions", []),
            failed=data["failed"],
        )
        intent = planning.Intent.upgrade(data["revision"] or "head", allow_downgrade=False)
        try:
            staged = rollouts.plan_rollout(targets, intent, data["waves"])
        except rollouts.WavesError as exc:
            raise ValidationError({"waves": str(exc)}) from None
        if data["dry_run"]:
            return Response(staged.as_dict())
        if not staged.size:
            return Response(
                {**staged.as_dict(), "detail": "Nothing to roll out: no target can go there."},
                status=status.HTTP_409_CONFLICT,
            )
        rollout = rollouts.do_start_rollout(
            staged,
            trigger=Trigger.API,
            acting_user=request.user,
            selection={k: data[k] for k in RolloutRequest.SCOPES if data.get(k)},
            max_failures=data.get("max_failures"),
            max_failure_rate=data.get("max_failure_rate"),
            bake_seconds=data["bake_seconds"],
            per_server_concurrency=data.get("per_server_concurrency"),
        )
        return Response(rollout_as_json(rollout, request), status=status.HTTP_201_CREATED)


class RolloutView(ApiView):
    """``GET /api/rollouts/<id>``: its waves, each target's state, failures, what to do."""

    @extend_schema(responses=OpenApiTypes.OBJECT)
    def get(self, request, rollout_id):
        from tenants.models import Rollout

        return Response(rollout_as_json(get_object_or_404(Rollout, pk=rollout_id), request))


class RolloutSteerView(ApiView):
    """``POST /api/rollouts/<id>/resume`` (a halted one) and ``…/abort`` (one not finished):
    200 with the rollout, 409 saying why not."""

    verb = ""

    @extend_schema(request=None, responses={200: OpenApiTypes.OBJECT, 409: OpenApiTypes.OBJECT})
    def post(self, request, rollout_id):
        from tenants import rollouts
        from tenants.models import Rollout

        rollout = get_object_or_404(Rollout, pk=rollout_id)
        done, refusal = rollouts.do_steer_rollout(rollout, self.verb, acting_user=request.user)
        if done is None:
            return Response(
                {**rollout_as_json(rollout, request), "detail": refusal},
                status=status.HTTP_409_CONFLICT,
            )
        return Response(rollout_as_json(done, request))
