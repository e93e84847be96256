"""Small things a first hour in the admin hits: a Migrate button on a target's page, a neutral
mark for a schema that is not drifted, and "View site" leading to the fleet dashboard."""

import pytest
from django.urls import reverse


@pytest.mark.django_db
def test_the_migrate_button_queues_the_target_and_says_so(admin_client, target_factory):
    from tenants.models import MigrationRun

    target = target_factory(name="acme")
    page = reverse("admin:tenants_migrationtarget_change", args=[target.pk])
    button = reverse("admin:tenants_migrationtarget_migrate", args=[target.pk])
    html = admin_client.get(page).content.decode()
    assert f'action="{button}"' in html
    assert "Migrate to head</button>" in html

    response = admin_client.post(button, follow=True)
    assert response.redirect_chain == [(page, 302)]
    run = MigrationRun.objects.get(target=target)
    assert (run.status, run.trigger, run.triggered_by.username) == ("queued", "admin", "admin")
    assert f"Run #{run.pk} queued for acme (head)." in response.content.decode()

    target.held = True
    target.save()
    run.status = "cancelled"
    run.save()
    response = admin_client.post(button, follow=True)
    assert "Not queued for acme: the target is held" in response.content.decode()
    assert admin_client.get(button).status_code == 405


@pytest.mark.django_db
def test_the_button_needs_the_run_migrations_permission(client, django_user_model, target_factory):
    from django.contrib.auth.models import Permission

    target = target_factory()
    user = django_user_model.objects.create_user("viewer", is_staff=True)
    user.user_permissions.add(*Permission.objects.filter(codename__in=["view_migrationtarget"]))
    client.force_login(user)
    html = client.get(
        reverse("admin:tenants_migrationtarget_change", args=[target.pk])
    ).content.decode()
    assert "Migrate to head</button>" not in html
    button = reverse("admin:tenants_migrationtarget_migrate", args=[target.pk])
    assert client.post(button).status_code == 403


@pytest.mark.django_db
def test_drifted_shows_only_for_a_drifted_schema(admin_client, target_factory):
    from django.utils import timezone

    target_factory(name="clean", verified_at=timezone.now())
    target_factory(name="unverified")
    target_factory(name="changed", drifted=True, verified_at=timezone.now())
    html = admin_client.get(reverse("admin:tenants_migrationtarget_changelist")).content.decode()
    cells = [part.split("</td>")[0] for part in html.split('<td class="field-drift">')[1:]]
    assert cells == [
        '<strong style="color: var(--error-fg, #ba2121)">drifted</strong>',
        "no",
        "–",
    ]


@pytest.mark.django_db
def test_view_site_leads_to_the_fleet_dashboard(admin_client):
    html = admin_client.get(reverse("admin:index")).content.decode()
    assert '<a href="/admin/fleet/">View site</a>' in html
    assert admin_client.get("/admin/fleet/").status_code == 200


@pytest.mark.django_db
def test_a_dedicated_tenant_added_with_a_provider_brings_its_database(admin_client):
    from tenants.models import MigrationRun, MigrationTarget, Tenant

    form = {
        "id": "acme",
        "name": "Acme",
        "strategy": "dedicated",
        "region": "eu",
        "auto_migrate": "on",
        "database_provider": "postgresql",
        "database_vault_path": "customers/acme",
    }
    with_target = admin_client.post(reverse("admin:tenants_tenant_add"), form)
    assert with_target.status_code == 302, with_target.content.decode()
    target = MigrationTarget.objects.get(name="acme")
    assert (target.kind, target.provider, target.region, target.vault_path) == (
        "dedicated",
        "postgresql",
        "eu",
        "customers/acme",
    )
    assert Tenant.objects.get(pk="acme").target == target
    # Its first migration, queued by the tenant-created signal.
    assert MigrationRun.objects.get(target=target).trigger == "signal"

    taken = admin_client.post(reverse("admin:tenants_tenant_add"), {**form, "id": "acme"})
    assert "Tenant with this Tenant id already exists." in taken.content.decode()
    shared = admin_client.post(
        reverse("admin:tenants_tenant_add"), {**form, "id": "beta", "strategy": "shared"}
    )
    assert "Only for a dedicated or external tenant with no target chosen" in (
        shared.content.decode()
    )


@pytest.mark.django_db
def test_the_fleet_header_says_which_branch_each_head_ends(admin_client):
    from migrator import phases

    heads = phases.branch_heads()
    html = admin_client.get("/admin/fleet/").content.decode()
    assert (
        f"heads: <strong>{heads['expand']} (expand), {heads['contract']} (contract)</strong>"
        " &mdash; the heads of the blue/green expand and contract branches." in html
    ), html
