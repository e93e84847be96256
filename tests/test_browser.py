"""The first hour of a new user, in a real headless Chromium against a live control plane.

An operator logs in to the admin, looks at the fleet dashboard, migrates three tenants from the
Tenants list (a PostgreSQL one, a MariaDB one and one whose Vault secret was never written),
watches the runs finish on the dashboard, and reads why the third one failed. Real worker
processes (``manage.py qcluster``) run the migrations against real databases and a real OpenBao.
Screenshots of the dashboard and of the failed run are saved under ``test-artifacts/``.
"""

import re
import time

import pytest
from django.contrib.auth.models import Permission

from tenants.models import MigrationRun
from tests.browser import browser, page, screenshot  # noqa: F401 - fixtures
from tests.dispatch_fixtures import HEAD
from tests.workers import process_env, qcluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vault,
    pytest.mark.postgres,
    pytest.mark.mysql,
    pytest.mark.django_db(transaction=True),
]

PASSWORD = "first-hour-pw"  # noqa: S105 - a throw-away test user


@pytest.fixture
def operator(django_user_model):
    """A staff user who may see tenants and runs and start migrations, nothing more."""
    user = django_user_model.objects.create_user("operator", password=PASSWORD, is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(
            content_type__app_label="tenants",
            codename__in=[
                "view_tenant",
                "change_tenant",
                "view_migrationtarget",
                "view_migrationrun",
                "run_migrations",
            ],
        )
    )
    return user


def log_in(tab, base_url, user):
    tab.goto(f"{base_url}/admin/")
    assert "/admin/login/" in tab.url  # anonymous: sent to the login page
    tab.fill("input[name=username]", user.username)
    tab.fill("input[name=password]", PASSWORD)
    tab.click("input[type=submit]")
    tab.wait_for_selector("#site-name")
    assert "/admin/login/" not in tab.url


def wait_until_finished(tab, url, *, timeout=90):
    """Reload the dashboard until it stops refreshing itself: no run is queued or running and
    no target is migrating. Bounded; returns the "In progress" card's text."""
    deadline = time.monotonic() + timeout
    while True:
        tab.goto(url)
        if tab.locator('meta[http-equiv="refresh"]').count() == 0:
            return tab.inner_text("#fleet-active")
        if time.monotonic() > deadline:
            heading = tab.inner_text("#fleet-active h2")
            raise AssertionError(f"runs still in progress after {timeout}s: {heading}")
        time.sleep(0.5)


def test_first_hour_of_a_new_operator(page, live_server, operator, registered_tenant, tmp_path):  # noqa: F811
    pg = registered_tenant("postgresql")
    my = registered_tenant("mysql")
    broken = registered_tenant("missing-secret")
    base = live_server.url
    worker_log = tmp_path / "qcluster.log"

    with qcluster(process_env(), worker_log):
        log_in(page, base, operator)

        # The admin index leads to the fleet dashboard, which shows the three new targets.
        screenshot(page, "admin-index")
        page.click("text=Fleet dashboard")
        assert page.url == f"{base}/admin/fleet/"
        assert page.inner_text("#fleet-dashboard p >> nth=0").startswith("3 targets")
        assert re.search(r"3\s*Unknown", page.inner_text("#fleet-status"))
        assert "Nothing is running." in page.inner_text("#fleet-active")

        # Tenants: select the three, run "Migrate to head".
        page.click("#nav-sidebar a:text-is('Tenants'), #content-main a:text-is('Tenants')")
        page.wait_for_selector("#result_list")
        for tenant in (pg, my, broken):
            page.check(f"input[name=_selected_action][value='{tenant.pk}']")
        page.select_option("select[name=action]", label="Migrate to head")
        page.click("button[name=index]")
        messages = page.inner_text("ul.messagelist")
        for tenant in (pg, my, broken):
            assert re.search(rf"Run #\d+ queued for {re.escape(tenant.id)} \(head\)", messages)

        # The dashboard follows the batch until every run is final.
        page.goto(f"{base}/admin/fleet/")
        screenshot(page, "fleet-dashboard-in-progress")
        active = wait_until_finished(page, f"{base}/admin/fleet/")

    assert "In progress (0)" in active and "Nothing is running." in active
    tiles = page.inner_text("#fleet-status")
    assert re.search(r"2\s*Up to date", tiles), tiles
    assert re.search(r"1\s*Failed", tiles), tiles
    head_row = page.locator("#fleet-revisions tr", has=page.locator(".fleet-badge"))
    assert re.fullmatch(rf"{HEAD}\s+head\s+2", head_row.inner_text().strip())
    failures = page.inner_text("#fleet-failures")
    assert broken.id in failures and f"secret/data/database/{broken.id}" in failures
    screenshot(page, "fleet-dashboard")

    # The runs list shows the outcome of each.
    page.goto(f"{base}/admin/tenants/migrationrun/")
    rows = {
        row.locator("td.field-target").inner_text(): row.locator("td.field-status").inner_text()
        for row in page.locator("#result_list tbody tr").all()
    }
    assert rows == {pg.id: "Succeeded", my.id: "Succeeded", broken.id: "Failed"}, (
        rows,
        worker_log.read_text(),
    )

    # The failed run's page says what is wrong and how to fix it.
    page.goto(f"{base}/admin/fleet/")
    failed_run = MigrationRun.objects.get(target__name=broken.id)
    page.click(f"#fleet-failures a:text-is('#{failed_run.pk}')")
    assert page.url.endswith(f"/admin/tenants/migrationrun/{failed_run.pk}/change/")
    error = page.inner_text(".field-error .readonly")
    assert f"secret/data/database/{broken.id}" in error
    assert "vault kv put" in error
    assert page.inner_text(".field-error_code .readonly") == "secret_not_found"
    assert page.inner_text(".field-status .readonly") == "Failed"
    screenshot(page, "failed-run")
