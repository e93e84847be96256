"""Which targets a trigger means: the one query every entry point uses to pick targets."""

from django.db.models import Case, IntegerField, Q, Value, When

from tenants.models import MigrationTarget, Strategy, TargetStatus


def select_targets(
    *,
    all_targets=False,
    shared=False,
    tenant_ids=(),
    target_names=(),
    strategies=(),
    providers=(),
    regions=(),
    failed=False,
):
    """Return a queryset of targets, ordered shared first then by name.

    Scopes (``all_targets``, ``shared``, ``tenant_ids``, ``target_names``, ``strategies``,
    ``failed``) are OR-ed: each adds targets. Filters (``providers``, ``regions``) then narrow
    them. With no scope but a filter, every target is in scope. Decommissioned targets are in
    no scope but their names (``tenant_ids``, ``target_names``): named, the plan says why they
    get no run.
    """
    active = Q(decommissioned_at__isnull=True)
    scope = Q()
    if shared:
        scope |= Q(kind=Strategy.SHARED) & active
    if tenant_ids:
        scope |= Q(tenants__id__in=tenant_ids)
    if target_names:
        scope |= Q(name__in=target_names)
    if strategies:
        scope |= Q(kind__in=strategies) & active
    if failed:
        # An interrupted run leaves its target failed too (see tenants.actions).
        scope |= Q(status=TargetStatus.FAILED) & active
    queryset = MigrationTarget.objects.all()
    if all_targets:
        queryset = queryset.filter(active | scope)
    else:
        if not scope and not (providers or regions):
            return queryset.none()
        queryset = queryset.filter(scope) if scope else queryset.filter(active)
    if providers:
        queryset = queryset.filter(provider__in=providers)
    if regions:
        queryset = queryset.filter(region__in=regions)
    # Shared databases first: the shared tier is most tenants at once.
    return (
        queryset.annotate(
            shared_first=Case(
                When(kind=Strategy.SHARED, then=Value(0)),
                default=Value(1),
                output_field=IntegerField(),
            )
        )
        .order_by("shared_first", "name")
        .distinct()
    )


def missing_tenants(tenant_ids):
    """The ids among ``tenant_ids`` that name no tenant."""
    from tenants.models import Tenant

    found = set(Tenant.objects.filter(id__in=tenant_ids).values_list("id", flat=True))
    return [tenant_id for tenant_id in tenant_ids if tenant_id not in found]
