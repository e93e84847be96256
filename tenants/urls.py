from django.http import JsonResponse
from django.urls import path

from tenants import api
from tenants.health import ReadinessView
from tenants.metrics import metrics_view


def healthz(request):
    """Liveness: the process answers. Touches nothing else."""
    return JsonResponse({"status": "ok"})


urlpatterns = [
    path(
        "api/tenants/<str:tenant_id>/migrate", api.MigrateTenantView.as_view(), name="api-migrate"
    ),
    path("api/runs/<int:run_id>", api.RunView.as_view(), name="api-run"),
    path("api/runs/<int:run_id>/cancel", api.CancelRunView.as_view(), name="api-run-cancel"),
    path("healthz", healthz, name="healthz"),
    path("readyz", ReadinessView.as_view(), name="readyz"),
    path("metrics", metrics_view, name="metrics"),
]
