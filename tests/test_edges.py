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
