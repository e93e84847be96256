"""A retired tenant or target gets no more runs, says why, and keeps its history: from the admin,
through the planner every trigger uses, and out of ``migrate_tenants --all``."""

import io

import pytest
from django.core.management import call_command
from django.urls import reverse


def migrate_tenants(*args):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("migrate_tenants", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_the_admin_action_retires_a_tenant_and_its_database(admin_client, tenant_factory):
    from tenants import actions, planning
    from tenants.models import MigrationRun, Trigger

    tenant = tenant_factory(auto_migrate=False)
    kept = tenant_factory(auto_migrate=False)
    [row] = planning.plan([tenant.target], planning.Intent.upgrade())
    [dispatch] = actions.do_enqueue_plan([row], trigger=Trigger.ADMIN, enqueue=False)

    response = admin_client.post(
        reverse("admin:tenants_tenant_changelist"),
        {"action": "decommission", "_selected_action": [tenant.pk]},
        follow=True,
    )
    text = response.content.decode()
    assert (
        f"Tenant {tenant.pk} decommissioned: it gets no more runs; run #{dispatch.run.pk} cancelled."
        in (text)
    )
    tenant.refresh_from_db()
    tenant.target.refresh_from_db()
    assert tenant.decommissioned and tenant.target.decommissioned
    assert MigrationRun.objects.get(pk=dispatch.run.pk).status == "cancelled"  # kept, closed

    # Migrating it from the admin is refused, saying why.
    response = admin_client.post(
        reverse("admin:tenants_tenant_changelist"),
        {"action": "migrate_to_head", "_selected_action": [tenant.pk]},
        follow=True,
    )
    assert f"Not queued for {tenant.target.name}: the target is decommissioned" in (
        response.content.decode()
    )
    assert MigrationRun.objects.count() == 1

    # A second time: refused with the reason.
    response = admin_client.post(
        reverse("admin:tenants_tenant_changelist"),
        {"action": "decommission", "_selected_action": [tenant.pk]},
        follow=True,
    )
    assert (
        f"Tenant {tenant.pk} not decommissioned: Tenant {tenant.pk} is already decommissioned."
        in (response.content.decode())
    )

    # The list can show the retired ones, or the others.
    response = admin_client.get(
        reverse("admin:tenants_tenant_changelist"), {"decommissioned_at__isnull": "True"}
    )
    assert kept.pk in response.content.decode()
    assert f">{tenant.pk}<" not in response.content.decode()


@pytest.mark.django_db
def test_a_shared_target_with_active_tenants_is_not_retired(admin_client, tenant_factory):
    tenant = tenant_factory(strategy="shared", auto_migrate=False)
    response = admin_client.post(
        reverse("admin:tenants_migrationtarget_changelist"),
        {"action": "decommission", "_selected_action": [tenant.target.pk]},
        follow=True,
    )
    assert f"still holds tenant(s) {tenant.pk}: decommission them first." in (
        response.content.decode()
    )
    tenant.target.refresh_from_db()
    assert not tenant.target.decommissioned


@pytest.mark.django_db
def test_the_action_needs_the_register_permission(client, django_user_model, tenant_factory):
    from django.contrib.auth.models import Permission

    tenant = tenant_factory(auto_migrate=False)
    user = django_user_model.objects.create_user("clerk", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_tenant", "change_tenant"])
    )
    client.force_login(user)
    page = client.get(reverse("admin:tenants_tenant_changelist")).content.decode()
    assert 'value="decommission"' not in page
    user.user_permissions.add(Permission.objects.get(codename="register_tenants"))
    user = django_user_model.objects.get(pk=user.pk)
    client.force_login(user)
    page = client.get(reverse("admin:tenants_tenant_changelist")).content.decode()
    assert 'value="decommission"' in page
    assert not tenant.decommissioned


@pytest.mark.django_db
def test_migrate_tenants_all_leaves_retired_targets_out_and_names_them_when_asked(
    tenant_factory,
):
    from tenants import actions

    retired = tenant_factory(auto_migrate=False)
    assert actions.do_decommission_tenant(retired).done
    code, out, err = migrate_tenants("--all", "--json")
    assert retired.target.name not in out + err
    # Named, it is said and skipped, as a held target is: it stops nothing else.
    other = tenant_factory(auto_migrate=False)
    code, out, err = migrate_tenants("--tenant", retired.pk, other.pk)
    assert f"{retired.target.name}: the target is decommissioned" in out + err, out + err
    assert other.target.name in out
    assert code == 0


@pytest.mark.django_db
def test_the_fleets_counts_and_checks_leave_retired_targets_out(
    admin_client, client, tenant_factory, vault
):
    """The dashboard, /readyz's counts, /metrics and vault_check count the fleet that gets runs:
    a retired target would stay "behind" or "unknown" for ever."""
    from django.core.management.base import CommandError

    from tenants import actions

    kept = tenant_factory(auto_migrate=False)
    retired = tenant_factory(auto_migrate=False)
    assert actions.do_decommission_tenant(retired).done

    dashboard = admin_client.get("/admin/fleet/").content.decode()
    assert "1 target;" in dashboard, dashboard
    ready = client.get("/readyz?format=json").json()
    assert sum(ready["targets"].values()) == 1, ready
    metrics = client.get("/metrics").content.decode()
    assert (
        'tenant_migrations_targets{provider="postgresql",region="default",status="unknown"} 1.0'
        in (metrics)
    )
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 of 1 targets not OK"):
        call_command("vault_check", stdout=out)  # kept's secret was never written
    assert kept.target.name in out.getvalue()
    assert retired.target.name not in out.getvalue()
