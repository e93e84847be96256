"""The admin pages for tenants, targets and runs: usable, read-only where they should be, and
bounded in queries whatever the size of the fleet."""

import pytest
from django.urls import reverse

from tenants.models import MigrationRun, MigrationTarget, Tenant

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet(target_factory):
    """1,000 dedicated tenants, each with its own target and two runs, plus a shared database."""
    shared = target_factory(name="shared", kind="shared")
    targets = MigrationTarget.objects.bulk_create(
        MigrationTarget(
            name=f"t{i:04d}",
            kind="dedicated",
            provider="postgresql",
            vault_path=f"t{i:04d}",
            revision="0004_accounts_display_name",
            status="up_to_date",
        )
        for i in range(1000)
    )
    Tenant.objects.bulk_create(
        Tenant(id=t.name, name=f"Tenant {t.name}", strategy="dedicated", target=t) for t in targets
    )
    Tenant.objects.create(id="small-co", name="Small Co", strategy="shared", target=shared)
    MigrationRun.objects.bulk_create(
        MigrationRun(target=t, trigger="command", status=status)
        for t in targets
        for status in ("succeeded", "failed")
    )
    return targets


@pytest.mark.parametrize(
    ("url_name", "first_row"),
    [
        ("tenants_tenant_changelist", b"Tenant t0000"),
        ("tenants_migrationtarget_changelist", b"t0000"),
        ("tenants_migrationrun_changelist", b"t0999"),  # newest first
    ],
)
def test_changelists_stay_bounded_with_a_thousand_tenants(
    admin_client, fleet, django_assert_max_num_queries, url_name, first_row
):
    with django_assert_max_num_queries(12):
        response = admin_client.get(reverse(f"admin:{url_name}"))
    assert response.status_code == 200
    assert first_row in response.content


def test_filtered_and_searched_lists(admin_client, fleet):
    response = admin_client.get(reverse("admin:tenants_tenant_changelist"), {"q": "t0042"})
    assert b"Tenant t0042" in response.content
    assert b"Tenant t0043" not in response.content
    response = admin_client.get(
        reverse("admin:tenants_tenant_changelist"), {"strategy__exact": "shared"}
    )
    assert b"Small Co" in response.content
    assert b"Tenant t0001" not in response.content


def test_target_page_shows_its_run_history(admin_client, fleet, django_assert_max_num_queries):
    target = fleet[7]
    MigrationRun.objects.filter(target=target, status="failed").update(
        error="Migration failed for tenant t0007 at revision 0003_projects_index: boom"
    )
    with django_assert_max_num_queries(12):
        response = admin_client.get(
            reverse("admin:tenants_migrationtarget_change", args=[target.pk])
        )
    content = response.content.decode()
    assert "Latest 20 runs" in content
    assert "Migration failed for tenant t0007 at revision 0003_projects_index" in content


def test_runs_are_read_only(admin_client, fleet):
    run = MigrationRun.objects.first()
    response = admin_client.get(reverse("admin:tenants_migrationrun_change", args=[run.pk]))
    assert response.status_code == 200
    assert b'name="_save"' not in response.content
    assert admin_client.get(reverse("admin:tenants_migrationrun_add")).status_code == 403


def test_admin_rejects_bad_tenant_with_clear_messages(admin_client, target_factory):
    url = reverse("admin:tenants_tenant_add")
    response = admin_client.post(
        url,
        {
            "id": "Bad Id!",
            "name": "Bad",
            "strategy": "dedicated",
            "region": "default",
            "auto_migrate": "on",
        },
    )
    assert response.status_code == 200
    content = response.content.decode()
    assert "lower-case letters, digits" in content
    response = admin_client.post(
        url,
        {
            "id": "acme",
            "name": "Acme",
            "strategy": "dedicated",
            "region": "default",
            "auto_migrate": "on",
        },
    )
    assert "needs a migration target of its own" in response.content.decode()
    assert not Tenant.objects.filter(id="acme").exists()


def test_admin_rejects_unknown_provider(admin_client):
    response = admin_client.post(
        reverse("admin:tenants_migrationtarget_add"),
        {"name": "acme", "kind": "dedicated", "provider": "oracle", "region": "default"},
    )
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode() or "Unknown provider" in (
        response.content.decode()
    )
    assert not MigrationTarget.objects.filter(name="acme").exists()


def test_run_migrations_permission_is_separate_from_editing(django_user_model):
    from django.contrib.auth.models import Permission

    perm = Permission.objects.get(codename="run_migrations")
    assert perm.content_type.app_label == "tenants"
    editor = django_user_model.objects.create_user("editor", password="pw")
    editor.user_permissions.add(Permission.objects.get(codename="change_tenant"))
    assert editor.has_perm("tenants.change_tenant")
    assert not editor.has_perm("tenants.run_migrations")
