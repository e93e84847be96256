"""Registering a tenant in the admin, in a real headless Chromium against a live control plane:
an operator adds a dedicated tenant with its database's provider, and sees its first run (queued
by the tenant-created signal) carried out by a real worker against a real PostgreSQL database
whose credentials are in a real OpenBao."""

import time

import pytest
from django.contrib.auth.models import Permission

from tests.browser import browser, page, screenshot  # noqa: F401 - fixtures
from tests.dispatch_fixtures import HEAD
from tests.test_browser import PASSWORD, log_in
from tests.workers import process_env, qcluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vault,
    pytest.mark.postgres,
    pytest.mark.django_db(transaction=True),
]


@pytest.fixture
def registrar(django_user_model):
    """A staff user who may add tenants and their databases, and see runs."""
    user = django_user_model.objects.create_user("registrar", password=PASSWORD, is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="tenants",
            codename__in=[
                "add_tenant",
                "view_tenant",
                "change_tenant",
                "add_migrationtarget",
                "view_migrationtarget",
                "view_migrationrun",
            ],
        )
    )
    return user


def test_a_tenant_registered_in_the_admin_gets_its_first_run(
    page,  # noqa: F811
    live_server,
    registrar,
    vault,
    vault_secret,
    pg_database,
    tmp_path,
):
    db = pg_database()
    vault_secret("customers/acme-co", db.secret())
    base = live_server.url

    with qcluster(process_env(), tmp_path / "qcluster.log"):
        log_in(page, base, registrar)
        page.goto(f"{base}/admin/tenants/tenant/add/")
        page.fill("input[name=id]", "acme-co")
        page.fill("input[name=name]", "Acme Co")
        page.select_option("select[name=strategy]", "dedicated")
        page.select_option("select[name=database_provider]", "postgresql")
        page.fill("input[name=database_vault_path]", "customers/acme-co")
        page.click("input[name=_save]")
        assert "was added successfully" in page.inner_text("ul.messagelist")

        # Its first run: on the runs list, until the worker has carried it out.
        deadline = time.monotonic() + 120
        while True:
            page.goto(f"{base}/admin/tenants/migrationrun/")
            row = page.locator("#result_list tbody tr", has_text="acme-co")
            status = row.locator("td.field-status").inner_text() if row.count() else ""
            if status in ("Succeeded", "Failed"):
                break
            assert time.monotonic() < deadline, f"the first run is still {status or 'absent'}"
            time.sleep(0.5)
        screenshot(page, "registered-tenant-first-run")
        assert status == "Succeeded", (tmp_path / "qcluster.log").read_text()
        assert row.locator("td.field-triggered").inner_text() == "Tenant created"

    page.goto(f"{base}/admin/tenants/tenant/")
    row = page.locator("#result_list tbody tr", has_text="acme-co")
    assert row.locator("td.field-revision").inner_text() == HEAD


def test_the_lists_show_what_matters_in_1400_pixels(
    page,  # noqa: F811
    live_server,
    django_user_model,
    tenant_factory,
):
    """The runs and targets lists fit beside their filters at 1400 px: no column (the error, the
    duration, the last migration) is cut off on the right."""
    from django.utils import timezone

    from tenants.models import MigrationRun

    user = django_user_model.objects.create_superuser("root", password=PASSWORD)
    for n in range(3):
        tenant = tenant_factory(id=f"a-rather-long-tenant-name-{n}", auto_migrate=False)
        MigrationRun.objects.create(
            target=tenant.target,
            trigger="admin",
            status="failed",
            revision_before="0003_projects_account_name",
            revision_after="0004_a_long_revision_name",
            duration_ms=12345,
            error="Vault at http://127.0.0.1:8200 cannot be reached: check VAULT_ADDR and that "
            "Vault is running and unsealed.",
            error_code="vault_unavailable",
            finished_at=timezone.now(),
        )
        tenant.target.revision = "0006_contract_drop_display_name"
        tenant.target.last_migrated_at = timezone.now()
        tenant.target.save()
    page.set_viewport_size({"width": 1400, "height": 900})
    log_in(page, live_server.url, user)
    for url in (
        "/admin/tenants/migrationrun/",
        "/admin/tenants/migrationtarget/",
        "/admin/tenants/tenant/",
    ):
        page.goto(live_server.url + url)
        table = page.locator("#result_list").bounding_box()
        filters = page.locator("#changelist-filter").bounding_box()
        assert table["x"] + table["width"] <= filters["x"], (url, table, filters)
    page.goto(live_server.url + "/admin/tenants/migrationrun/")
    row = page.locator("#result_list tbody tr").first
    assert row.locator("td.field-took").inner_text() == "12.3 s"
    assert row.locator("td.field-why").inner_text().startswith("Vault at http://127.0.0.1:8200")
    screenshot(page, "runs-list-1400px")


def test_the_api_docs_page_renders_from_the_control_planes_own_files(page, live_server):  # noqa: F811
    """Swagger UI at /api/docs/ draws every operation of /api/schema/; nothing comes from
    another host."""
    elsewhere = []
    page.on(
        "request",
        lambda request: (
            elsewhere.append(request.url) if not request.url.startswith(live_server.url) else None
        ),
    )
    page.goto(f"{live_server.url}/api/docs/")
    page.wait_for_selector(".opblock-summary-path")
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/api/tenants/" in [p.replace("\u200b", "") for p in paths], paths
    assert elsewhere == []
    screenshot(page, "api-docs")
