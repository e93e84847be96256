"""Rollback (downgrade a target, a selection or the fleet; undo the last run; irreversible
revisions refused up front) and blue/green expand/contract across the fleet, on real databases."""

import io
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse
from sqlalchemy import inspect as sa_inspect

from migrator import phases, runner
from tenants.models import MigrationRun, MigrationTarget
from tests.dispatch_fixtures import HEAD
from tests.test_reliability import _target_of, migrate_once

pytestmark = [pytest.mark.django_db, pytest.mark.vault]

FIXTURES = Path(__file__).parent / "alembic_fixtures"


def command(*args):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("migrate_tenants", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    except CommandError as exc:
        code = exc.returncode
        err.write(str(exc))
    return code, out.getvalue(), err.getvalue()


def columns(tenant, table):
    from sqlalchemy import create_engine

    engine = create_engine(tenant.database.sqlalchemy_url())
    try:
        return {c["name"] for c in sa_inspect(engine).get_columns(table)}
    finally:
        engine.dispose()


# --- rollback -------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["postgresql", "mysql"])
def test_downgrade_then_upgrade_again(provider, registered_tenant):
    tenant = registered_tenant(provider)
    assert migrate_once(tenant.target).revision_after == HEAD
    assert "full_name" in columns(tenant, "accounts")

    code, out, err = command("--tenant", tenant.id, "--to", "0002_projects", "--sync", "--yes")
    assert code == 0, err
    run = MigrationRun.objects.filter(target=tenant.target).first()
    assert (run.kind, run.status) == ("downgrade", "succeeded")
    assert run.applied == [
        "0006_contract_drop_display_name",
        "0005_expand_full_name",
        "0004_accounts_display_name",
        "0003_projects_account_name",
    ]
    assert run.revision_before == HEAD and run.revision_after == "0002_projects"
    assert {"display_name", "full_name"}.isdisjoint(columns(tenant, "accounts"))
    assert MigrationTarget.objects.get(pk=tenant.target_id).revision == "0002_projects"

    code, _, err = command("--tenant", tenant.id, "--sync")
    assert code == 0, err
    assert "full_name" in columns(tenant, "accounts")
    assert MigrationTarget.objects.get(pk=tenant.target_id).status == "up_to_date"


def test_downgrade_asks_for_confirmation(registered_tenant, monkeypatch):
    tenant = registered_tenant("postgresql")
    migrate_once(tenant.target)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no terminal
    code, _, err = command("--tenant", tenant.id, "--to", "0001_accounts", "--sync")
    assert code == 2
    assert "need a confirmation" in err and "--yes" in err
    assert f"{tenant.target.name}: {HEAD} -> 0001_accounts" in err
    assert MigrationRun.objects.filter(kind="downgrade").count() == 0


def test_undo_the_last_run(registered_tenant):
    tenant = registered_tenant("postgresql")
    migrate_once(tenant.target, revision="0002_projects")
    migrate_once(tenant.target)  # 0002 -> head
    code, _, err = command("--tenant", tenant.id, "--undo-last", "--sync", "--yes")
    assert code == 0, err
    target = MigrationTarget.objects.get(pk=tenant.target_id)
    assert target.revision == "0002_projects"
    assert runner.current(_target_of(tenant)).revision == "0002_projects"


def test_irreversible_revisions_are_refused_before_anything_runs(registered_tenant, settings):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "irreversible")
    tenant = registered_tenant("postgresql")
    assert migrate_once(tenant.target).revision_after == "r003_raises"
    code, _, err = command("--tenant", tenant.id, "--to", "base", "--sync", "--yes")
    assert code == 2
    assert "r003_raises: its downgrade() raises" in err
    assert "r002_empty_downgrade: its downgrade() is empty" in err
    assert not MigrationRun.objects.filter(kind="downgrade").exists()
    # The task refuses as well, should a downgrade reach it some other way.
    run = migrate_once(tenant.target, kind="downgrade", revision="r001_base")
    assert run.status == "failed" and "Nothing was run" in run.error
    assert runner.current(_target_of(tenant)).revision == "r003_raises"


def test_admin_downgrade_shows_the_plan_then_runs_it(admin_client, registered_tenant):
    tenant = registered_tenant("postgresql")
    migrate_once(tenant.target)
    url = reverse("admin:tenants_migrationtarget_changelist")
    form = {"action": "downgrade_to_revision", "_selected_action": [tenant.target_id]}
    page = admin_client.post(url, form)
    assert page.status_code == 200 and b'name="revision"' in page.content
    page = admin_client.post(url, {**form, "revision": "0003_projects_account_name"})
    text = page.content.decode()
    assert HEAD in text and "Yes, downgrade 1 target" in text
    assert "DROP COLUMN display_name" in text  # the SQL it will run
    assert not MigrationRun.objects.filter(kind="downgrade").exists()
    admin_client.post(url, {**form, "revision": "0003_projects_account_name", "confirm": "yes"})
    run = MigrationRun.objects.get(kind="downgrade")
    assert (run.status, run.requested_revision, run.trigger) == (
        "queued",
        "0003_projects_account_name",
        "admin",
    )


def test_admin_undo_last_run_page(admin_client, registered_tenant):
    tenant = registered_tenant("postgresql")
    migrate_once(tenant.target, revision="0003_projects_account_name")
    url = reverse("admin:tenants_tenant_changelist")
    page = admin_client.post(url, {"action": "undo_last_run", "_selected_action": [tenant.pk]})
    text = page.content.decode()
    assert "0003_projects_account_name" in text and ">base<" in text


# --- blue/green -----------------------------------------------------------------------------


def test_expand_contract_across_the_fleet_with_the_gate(registered_tenant, settings):
    from sqlalchemy import create_engine, text

    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "expand_contract")
    first, second = registered_tenant("postgresql"), registered_tenant("postgresql")
    for tenant in (first, second):
        migrate_once(tenant.target, revision="x001_accounts")
    names = [first.target.name, second.target.name]

    # Expand only the first tenant: contract is refused, naming the one that lags.
    code, _, err = command("--target", first.target.name, "--phase", "expand", "--sync")
    assert code == 0, err
    assert (
        phases.state(MigrationTarget.objects.get(pk=first.target_id).revision).label == "expanded"
    )
    code, _, err = command("--target", *names, "--phase", "contract", "--sync")
    assert code == 1
    assert "Contract refused" in err and second.target.name in err
    assert first.target.name not in err.split("expand phase:")[1]
    assert not MigrationRun.objects.filter(phase="contract").exists()

    # Old and new application both work between the phases: the trigger keeps both columns.
    engine = create_engine(first.database.sqlalchemy_url())
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO accounts (email, display_name) VALUES ('old@x', 'Old App')"))
        conn.execute(text("INSERT INTO accounts (email, full_name) VALUES ('new@x', 'New App')"))
        rows = dict(conn.execute(text("SELECT display_name, full_name FROM accounts")).fetchall())
    engine.dispose()
    assert rows == {"Old App": "Old App", "New App": "New App"}

    code, _, err = command("--target", *names, "--phase", "expand", "--sync")
    assert code == 0, err
    code, _, err = command("--target", *names, "--phase", "contract", "--sync")
    assert code == 0, err
    for tenant in (first, second):
        assert "display_name" not in columns(tenant, "accounts")
        assert "full_name" in columns(tenant, "accounts")
        target = MigrationTarget.objects.get(pk=tenant.target_id)
        assert phases.state(target.revision).label == "contracted"
        assert target.status == "up_to_date"
    assert MigrationRun.objects.filter(phase="contract", status="succeeded").count() == 2


def test_admin_shows_phases_and_refuses_contract_naming_laggards(
    admin_client, registered_tenant, settings
):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "expand_contract")
    ahead, behind = registered_tenant("postgresql"), registered_tenant("postgresql")
    migrate_once(ahead.target, revision="expand@head")
    migrate_once(behind.target, revision="x001_accounts")
    url = reverse("admin:tenants_migrationtarget_changelist")
    text = admin_client.get(url).content.decode()
    assert "expanded" in text and "before expand" in text
    response = admin_client.post(
        url,
        {"action": "run_contract_phase", "_selected_action": [ahead.target_id, behind.target_id]},
        follow=True,
    )
    text = response.content.decode()
    assert "Contract refused" in text and behind.target.name in text
    assert not MigrationRun.objects.filter(phase="contract").exists()


def test_plain_head_applies_both_phases_for_a_new_tenant(registered_tenant, settings):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "expand_contract")
    tenant = registered_tenant("postgresql")
    run = migrate_once(tenant.target)
    assert run.status == "succeeded", run.error
    assert set(run.applied) == {
        "x001_accounts",
        "x002_expand_full_name",
        "x003_contract_drop_display_name",
    }
    assert run.target.status == "up_to_date"


def test_a_target_only_expanded_is_behind_head(registered_tenant, settings):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "expand_contract")
    tenant = registered_tenant("postgresql")
    run = migrate_once(tenant.target, revision="expand@head", phase="expand")
    assert run.revision_after == "x002_expand_full_name"
    assert run.target.status == "behind"


def test_dashboard_shows_where_the_fleet_stands_on_each_phase(
    admin_client, target_factory, settings
):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "expand_contract")
    target_factory(revision="x001_accounts")
    target_factory(revision="x002_expand_full_name")
    target_factory(revision="x002_expand_full_name")
    target_factory(revision="x003_contract_drop_display_name")
    text = admin_client.get(reverse("fleet-dashboard")).content.decode()
    section = text.split('id="fleet-phases"')[1].split("</table>")[0]
    assert 'Before expand</td><td class="fleet-num">1' in section
    assert 'Expanded</td><td class="fleet-num">2' in section
    assert 'Contracted</td><td class="fleet-num">1' in section


def test_the_example_pair_in_tenant_migrations(registered_tenant):
    """tenant_migrations/ ships a real expand/contract pair: display_name -> full_name."""
    from sqlalchemy import create_engine, text

    tenant = registered_tenant("postgresql")
    migrate_once(tenant.target, revision="0004_accounts_display_name")
    code, _, err = command("--tenant", tenant.id, "--phase", "expand", "--sync")
    assert code == 0, err
    assert {"display_name", "full_name"} <= columns(tenant, "accounts")
    engine = create_engine(tenant.database.sqlalchemy_url())
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO accounts (email, display_name) VALUES ('a@x', 'Ada')"))
        assert conn.execute(text("SELECT full_name FROM accounts")).scalar() == "Ada"
    engine.dispose()
    code, _, err = command("--tenant", tenant.id, "--phase", "contract", "--sync")
    assert code == 0, err
    assert "display_name" not in columns(tenant, "accounts")
    assert MigrationTarget.objects.get(pk=tenant.target_id).status == "up_to_date"
