from django.http import JsonResponse
from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from tenants import api
from tenants.health import ReadinessView
from tenants.metrics import metrics_view


def healthz(request):
    """Liveness: the process answers. Touches nothing else."""
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path("api/tenants/", api.TenantListView.as_view(), name="api-tenants"),
    path("api/tenants/<str:tenant_id>", api.TenantDetailView.as_view(), name="api-tenant"),
    path(
        "api/tenants/<str:tenant_id>/decommission",
        api.TenantDecommissionView.as_view(),
        name="api-tenant-decommission",
    ),
    path("api/targets/", api.TargetListView.as_view(), name="api-targets"),
    path("api/targets/<str:name>", api.TargetDetailView.as_view(), name="api-target"),
    path(
        "api/targets/<str:name>/decommission",
        api.TargetDecommissionView.as_view(),
        name="api-target-decommission",
    ),
    # The OpenAPI schema and its docs page (Swagger UI, served from this app's static files).
    path(
        "api/schema/",
        SpectacularAPIView.as_view(authentication_classes=[], permission_classes=[]),
        name="api-schema",
    ),
    path(
        "api/docs/",
        SpectacularSwaggerView.as_view(
            url_name="api-schema", authentication_classes=[], permission_classes=[]
        ),
        name="api-docs",
    ),
    path(
        "api/tenants/<str:tenant_id>/migrate", api.MigrateTenantView.as_view(), name="api-migrate"
    ),
    path("api/runs/<int:run_id>", api.RunView.as_view(), name="api-run"),
    path("api/runs/<int:run_id>/cancel", api.CancelRunView.as_view(), name="api-run-cancel"),
    path("api/rollouts/", api.RolloutListView.as_view(), name="api-rollouts"),
    path("api/rollouts/<int:rollout_id>", api.RolloutView.as_view(), name="api-rollout"),
    path(
        "api/rollouts/<int:rollout_id>/resume",
        api.RolloutSteerView.as_view(verb="resume"),
        name="api-rollout-resume",
    ),
    path(
        "api/rollouts/<int:rollout_id>/abort",
        api.RolloutSteerView.as_view(verb="abort"),
        name="api-rollout-abort",
    ),
    path("healthz", healthz, name="healthz"),
    path("readyz", ReadinessView.as_view(), name="readyz"),
    path("metrics", metrics_view, name="metrics"),
]
