from django.contrib import admin
from django.urls import include, path

from controlplane.throttling import admin_login
from tenants.dashboard import fleet_dashboard

admin.site.site_header = "Tenant migrations"
admin.site.site_title = "Tenant migrations"
admin.site.index_template = "admin/fleet_index.html"
# "View site" leads to the fleet dashboard: the control plane has no public site.
admin.site.site_url = "/admin/fleet/"

urlpatterns = [
    path("admin/fleet/", fleet_dashboard, name="fleet-dashboard"),
    # Before the admin's own URLs: its login view, bounded (controlplane/throttling.py).
    path("admin/login/", admin_login),
    path("admin/", admin.site.urls),
    path("", include("tenants.urls")),
]
