"""Edges of the record and of the pipeline (issues 16 and 17): what the record says must be what
the databases are, and a migration must never block the application for long. Each test drives
the real path (a command, the admin, the API, a run on a real database, real OpenBao)."""

import io

import pytest
from django.core.management import call_command

from migrator import runner
from migrator.tasks import run_migration
from tenants import actions
from tenants.models import MigrationTarget, Trigger
from tests.dispatch_fixtures import HEAD

pytestmark = [pytest.mark.django_db, pytest.mark.vault]


def migrate_once(target, **kwargs):
    """Queue one run for ``target`` and execute it here; return the run as recorded."""
    kwargs.setdefault("trigger", Trigger.COMMAND)
    [dispatch] = actions.do_enqueue_runs([target], enqueue=False, **kwargs)
    run_migration(dispatch.run.pk)
    dispatch.run.refresh_from_db()
    dispatch.run.target.refresh_from_db()
    return dispatch.run


@pytest.fixture(autouse=True)
def _fresh_runner():
    runner.reset()
    yield
    runner.reset()


# --- a blank Vault path ------------------------------------------------------------------------


def test_blank_vault_path_means_the_same_path_for_vault_check_and_for_a_run(registered_tenant):
    tenant = registered_tenant("postgresql")
    # save() fills a blank path in, but loaddata, bulk_create and QuerySet.update do not.
    MigrationTarget.objects.filter(pk=tenant.target_id).update(vault_path="")
    target = MigrationTarget.objects.get(pk=tenant.target_id)
    assert target.vault_path == "" and target.effective_vault_path == target.name

    out = io.StringIO()
    call_command("vault_check", "--target", target.name, stdout=out)
    assert f"OK    {target.name}: secret/data/database/{target.name}" in out.getvalue()

    run = migrate_once(target)
    assert run.status == "succeeded", run.error
    assert run.target.revision == HEAD


# --- held targets ------------------------------------------------------------------------------


def _set_held_in_admin(client, target, held):
    """Tick or clear *Held* on the target's admin page and save, as an operator does."""
    from django.urls import reverse

    url = reverse("admin:tenants_migrationtarget_change", args=[target.pk])
    form = {
        "name": target.name,
        "kind": target.kind,
        "provider": target.provider,
        "region": target.region,
        "vault_path": target.vault_path,
        "backup_policy": target.backup_policy,
    }
    if held:
        form["held"] = "on"
    response = client.post(url, form)
    assert response.status_code == 302, response.content.decode()[:2000]
    target.refresh_from_db()
    return target


def _held_tile(client):
    import re

    html = client.get("/admin/fleet/").content.decode()
    match = re.search(r'fleet-tile held[^"]*"[^>]*><span class="n">(\d+)</span>Held', html)
    assert match, "no Held tile on the dashboard"
    return int(match.group(1))


@pytest.mark.django_db(transaction=True)  # /readyz runs its checks in a thread of their own
def test_holding_a_target_in_the_admin_shows_as_held_and_releasing_restores_its_status(
    registered_tenant, admin_client, target_factory
):
    tenant = registered_tenant("postgresql")
    assert migrate_once(tenant.target).status == "succeeded"
    target = MigrationTarget.objects.get(pk=tenant.target_id)
    assert target.status == "up_to_date"
    assert _held_tile(admin_client) == 0

    target = _set_held_in_admin(admin_client, target, True)
    assert (target.held, target.status) == (True, "held")
    assert _held_tile(admin_client) == 1
    assert admin_client.get("/readyz?format=json").json()["targets"]["held"] == 1
    [dispatch] = actions.do_enqueue_runs([target], trigger=Trigger.COMMAND, enqueue=False)
    assert dispatch.run is None and "held" in dispatch.message

    target = _set_held_in_admin(admin_client, target, False)
    assert (target.held, target.status) == (False, "up_to_date")
    assert _held_tile(admin_client) == 0
    assert admin_client.get("/readyz?format=json").json()["targets"]["held"] == 0


def test_a_target_held_while_its_run_is_queued_is_not_migrated(registered_tenant, admin_client):
    tenant = registered_tenant("postgresql")
    [dispatch] = actions.do_enqueue_runs([tenant.target], trigger=Trigger.COMMAND, enqueue=False)
    assert dispatch.run.status == "queued"
    _set_held_in_admin(admin_client, tenant.target, True)

    assert run_migration(dispatch.run.pk)["status"] == "not-queued"
    run = dispatch.run
    run.refresh_from_db()
    assert run.status == "cancelled"
    assert "held before the run started" in run.error and "nothing ran" in run.error
    target = MigrationTarget.objects.get(pk=tenant.target_id)
    assert (target.status, target.revision) == ("held", "")
    assert runner.current(_target_of(target)).revision is None  # the database was not touched


def _target_of(record):
    from migrator.secrets import get_secrets_manager
    from migrator.targets import Target

    return Target(
        record.name,
        get_secrets_manager().migration_credentials(
            record.effective_vault_path, provider=record.provider
        ),
    )
