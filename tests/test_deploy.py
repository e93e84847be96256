"""Deploying new revisions while the workers run: the next run sees the script directory as it
is on disk, without a restart of ``qcluster``."""

import json
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa

from tenants.models import MigrationTarget
from tests.workers import manage, process_env, qcluster

pytestmark = [pytest.mark.vault, pytest.mark.postgres, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
LINEAR_HEAD = "0004_accounts_display_name"

REVISION = '''"""{doc}

Revision ID: {revision}
Revises: {down}
"""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade():
{upgrade}


def downgrade():
    op.drop_table("{table}")
'''


def write_revision(versions, revision, down, table, *, broken=False):
    create = (
        f'    op.create_table("{table}", sa.Column("id", sa.Integer, primary_key=True))\n'
        f'    op.execute("INSERT INTO {table} (id) VALUES (1)")'
    )
    if broken:
        create += '\n    op.execute("UPDATE no_such_table SET x = 1")'
    text = REVISION.format(
        doc=f"Adds {table}" + (" (broken)" if broken else ""),
        revision=revision,
        down=down,
        table=table,
        upgrade=create,
    )
    (versions / f"{revision}.py").write_text(text)


@pytest.fixture
def script_copy(tmp_path, settings):
    """A script directory of its own (tenant_migrations' env.py, the four linear revisions),
    which the test deploys revisions into; the workers and commands read it through
    TENANT_MIGRATIONS_DIR."""
    location = tmp_path / "migrations"
    location.mkdir()
    shutil.copy(ROOT / "tenant_migrations" / "env.py", location)
    shutil.copy(ROOT / "tenant_migrations" / "script.py.mako", location)
    shutil.copytree(
        ROOT / "tests" / "alembic_fixtures" / "linear" / "versions",
        location / "versions",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    settings.TENANT_MIGRATIONS_DIR = str(location)
    return location


def migrate(tenant, env):
    """``migrate_tenants --tenant ID --wait --json``, as an operator types it: (exit code, the
    tenant's row)."""
    result = manage(
        "migrate_tenants", "--tenant", tenant.id, "--wait", "--json", "--timeout", "90", env=env
    )
    rows = json.loads(result.stdout or "[]")
    assert rows, (result.returncode, result.stdout, result.stderr)
    return result.returncode, rows[-1]


def tables(db):
    engine = sa.create_engine(db.sqlalchemy_url(), poolclass=sa.pool.NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


@pytest.mark.django_db(transaction=True)
def test_a_revision_deployed_while_the_workers_run_is_applied_by_the_next_run(
    registered_tenant, script_copy, tmp_path
):
    tenant = registered_tenant("postgresql")
    env = process_env(TENANT_MIGRATIONS_DIR=script_copy, workers=1)
    log = tmp_path / "qcluster.log"
    versions = script_copy / "versions"
    with qcluster(env, log):
        code, row = migrate(tenant, env)
        assert (code, row["status"], row["revision_after"]) == (0, "succeeded", LINEAR_HEAD)

        # Deployed while the cluster (which read the directory before forking) keeps running.
        write_revision(versions, "0005_deploy_notes", LINEAR_HEAD, "deploy_notes")
        code, row = migrate(tenant, env)
        assert (code, row["status"]) == (0, "succeeded"), (row, log.read_text())
        assert row["applied"] == ["0005_deploy_notes"]
        assert row["revision_after"] == "0005_deploy_notes"
        assert "deploy_notes" in tables(tenant.database)
        target = MigrationTarget.objects.get(pk=tenant.target.pk)
        assert (target.revision, target.status) == ("0005_deploy_notes", "up_to_date")

        # A broken revision fails; fixed on disk, the retry runs the new code.
        write_revision(versions, "0006_audit", "0005_deploy_notes", "audit", broken=True)
        code, row = migrate(tenant, env)
        assert (code, row["status"]) == (1, "failed"), row
        assert "no_such_table" in row["error"]
        assert "audit" not in tables(tenant.database)

        write_revision(versions, "0006_audit", "0005_deploy_notes", "audit")
        code, row = migrate(tenant, env)
        assert (code, row["status"], row["applied"]) == (0, "succeeded", ["0006_audit"]), (
            row,
            log.read_text(),
        )
    assert "audit" in tables(tenant.database)
    target = MigrationTarget.objects.get(pk=tenant.target.pk)
    assert (target.revision, target.status) == ("0006_audit", "up_to_date")


@pytest.mark.django_db
def test_a_web_process_shows_the_heads_on_disk_now(admin_client, client, script_copy, settings):
    from django.urls import reverse

    settings.METRICS_TOKEN = ""

    def head_info():
        text = client.get(reverse("metrics")).content.decode()
        return [line for line in text.splitlines() if line.startswith("tenant_migrations_head_")]

    assert head_info() == [f'tenant_migrations_head_info{{revision="{LINEAR_HEAD}"}} 1.0']
    write_revision(script_copy / "versions", "0005_deploy_notes", LINEAR_HEAD, "deploy_notes")

    assert head_info() == ['tenant_migrations_head_info{revision="0005_deploy_notes"} 1.0']
    page = admin_client.get(reverse("fleet-dashboard")).content.decode()
    assert "head: <strong>0005_deploy_notes</strong>" in page


@pytest.mark.django_db(transaction=True)  # /readyz runs its checks on threads of their own
def test_targets_at_the_old_head_show_behind_as_soon_as_a_revision_is_deployed(
    admin_client, client, script_copy, settings, target_factory, django_user_model
):
    """No run needed: the dashboard, /readyz, the API's status filter, the admin's list and
    /metrics all say behind once a revision is on disk; taking it off makes them up to date."""
    from django.contrib.auth.models import Permission
    from django.urls import reverse
    from knox.models import AuthToken

    settings.METRICS_TOKEN = ""
    shared = target_factory(kind="shared", revision=LINEAR_HEAD, status="up_to_date")
    dedicated = [target_factory(revision=LINEAR_HEAD, status="up_to_date") for _ in range(3)]
    held = target_factory(revision=LINEAR_HEAD, status="held", held=True)
    user = django_user_model.objects.create_user("provisioning")
    user.user_permissions.add(Permission.objects.get(codename="register_tenants"))
    api = {"HTTP_AUTHORIZATION": f"Bearer {AuthToken.objects.create(user=user)[1]}"}

    def behind_in_api():
        response = client.get(reverse("api-targets") + "?status=behind", **api)
        assert response.status_code == 200, response.content
        return sorted(row["name"] for row in response.json()["results"])

    def up_to_date_in_admin():
        page = admin_client.get(
            reverse("admin:tenants_migrationtarget_changelist") + "?status__exact=up_to_date"
        ).content.decode()
        return [t.name for t in [shared, *dedicated] if f">{t.name}<" in page]

    def metric(name, status):
        text = client.get(reverse("metrics")).content.decode()
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(name + "{") and f'status="{status}"' in line
        )

    assert client.get(reverse("readyz")).status_code == 200
    assert behind_in_api() == []
    assert len(up_to_date_in_admin()) == 4

    write_revision(script_copy / "versions", "0005_deploy_notes", LINEAR_HEAD, "deploy_notes")

    assert client.get(reverse("readyz")).status_code == 500  # the shared database is behind
    assert behind_in_api() == sorted([shared.name, *(t.name for t in dedicated)])
    assert up_to_date_in_admin() == []
    assert metric("tenant_migrations_targets", "behind") == 4
    page = admin_client.get(reverse("fleet-dashboard")).content.decode()
    assert "head: <strong>0005_deploy_notes</strong>" in page
    held.refresh_from_db()
    assert held.status == "held"  # a held target stays held

    # The revision taken back off the disk: they are at head again.
    (script_copy / "versions" / "0005_deploy_notes.py").unlink()
    assert behind_in_api() == []
    assert client.get(reverse("readyz")).status_code == 200
    assert len(up_to_date_in_admin()) == 4


@pytest.mark.django_db
def test_the_admins_downgrade_page_reads_the_revision_now_on_disk(
    admin_client, registered_tenant, script_copy
):
    """The preview and the check for an empty downgrade() come from the same read of the file."""
    from django.urls import reverse

    from tests.test_reliability import migrate_once

    tenant = registered_tenant("postgresql")
    assert migrate_once(tenant.target).status == "succeeded"

    def downgrade_page():
        response = admin_client.post(
            reverse("admin:tenants_migrationtarget_changelist"),
            {
                "action": "downgrade_to_revision",
                "_selected_action": [tenant.target.pk],
                "revision": "0003_projects_account_name",
            },
            follow=True,
        )
        assert response.status_code == 200
        return response.content.decode()

    assert "DROP COLUMN display_name" in downgrade_page()

    revision = script_copy / "versions" / "0004_accounts_display_name.py"
    original = revision.read_text()
    head, _ = original.split("def downgrade() -> None:")
    revision.write_text(
        head + "def downgrade() -> None:\n    op.execute(\"SELECT 'the downgrade as deployed'\")\n"
    )
    page = downgrade_page()
    assert "the downgrade as deployed" in page and "DROP COLUMN display_name" not in page

    revision.write_text(head + "def downgrade() -> None:\n    pass\n")
    page = downgrade_page()
    assert "its downgrade() is empty" in page
