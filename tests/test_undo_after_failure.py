"""Undo the last run after a deploy whose run failed on one target: that target's last run
changed nothing, so there is nothing of it to undo. It is left alone, saying so; it is never
taken back to where its previous successful run started (base, for a first migration: every
table dropped)."""

import io
import re
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from tenants.models import MigrationRun

pytestmark = [pytest.mark.vault, pytest.mark.postgres]

FIXTURES = Path(__file__).resolve().parent / "alembic_fixtures"

BROKEN = '''"""A revision with a mistake."""

from alembic import op

revision = "o004_broken"
down_revision = "o003_gizmos"
branch_labels = None
depends_on = None


def upgrade():
    op.execute("UPDATE no_such_table SET x = 1")


def downgrade():
    pass
'''


def migrate_tenants(*args):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("migrate_tenants", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue() + err.getvalue()


def revision_of(tenant):
    engine = sa.create_engine(tenant.database.sqlalchemy_url(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    finally:
        engine.dispose()


@pytest.mark.django_db
def test_undo_leaves_alone_a_target_whose_last_run_failed(
    registered_tenant, settings, tmp_path, admin_client
):
    location = tmp_path / "team"
    shutil.copytree(FIXTURES / "own_cookbook", location, ignore=shutil.ignore_patterns("__py*"))
    settings.TENANT_MIGRATIONS_DIR = str(location)
    failed, fine = registered_tenant("postgresql"), registered_tenant("postgresql")
    assert migrate_tenants("--tenant", failed.id, fine.id, "--sync")[0] == 0  # base -> o003

    # The deploy: a broken revision fails on one target; the other had a real run since.
    (location / "versions" / "o004_broken.py").write_text(BROKEN)
    code, said = migrate_tenants("--tenant", failed.id, "--sync")
    assert code == 1, said
    (location / "versions" / "o004_broken.py").unlink()
    assert migrate_tenants("--tenant", fine.id, "--to", "o002_gadgets", "--yes", "--sync")[0] == 0
    last_failed = MigrationRun.objects.filter(target=failed.target).latest("pk")
    assert last_failed.status == "failed"

    # The admin's confirmation page: the failed one is left alone, saying why; not "to base".
    page = admin_client.post(
        reverse("admin:tenants_migrationtarget_changelist"),
        {"action": "undo_last_run", "_selected_action": [failed.target_id, fine.target_id]},
        follow=True,
    )
    text = page.content.decode()
    assert page.status_code == 200
    assert f"its last run #{last_failed.pk} failed" in text, text
    assert "Yes, downgrade 1 target" not in text

    # The command: the one that can be undone is, the failed one keeps its tables.
    code, said = migrate_tenants("--tenant", failed.id, fine.id, "--undo-last", "--yes", "--sync")
    assert code == 0, said
    assert f"its last run #{last_failed.pk} failed" in said
    assert revision_of(failed) == "o003_gizmos"
    assert revision_of(fine) == "o003_gizmos"  # its downgrade undone
    assert not MigrationRun.objects.filter(target=failed.target, pk__gt=last_failed.pk).exists()


@pytest.mark.django_db
def test_the_dashboard_says_which_failures_were_since_put_right(
    registered_tenant, settings, tmp_path, admin_client
):
    """A failure that a later run of the same target put right is marked so on the fleet
    dashboard: 'Latest failures' no longer reads as several failing targets when one is."""
    location = tmp_path / "team"
    shutil.copytree(FIXTURES / "own_cookbook", location, ignore=shutil.ignore_patterns("__py*"))
    settings.TENANT_MIGRATIONS_DIR = str(location)
    fixed, still = registered_tenant("postgresql"), registered_tenant("postgresql")
    (location / "versions" / "o004_broken.py").write_text(BROKEN)
    assert migrate_tenants("--tenant", fixed.id, still.id, "--sync")[0] == 1
    first = MigrationRun.objects.get(target=fixed.target)
    (location / "versions" / "o004_broken.py").write_text(BROKEN.replace("UPDATE no_such", "--"))
    assert migrate_tenants("--tenant", fixed.id, "--sync")[0] == 0
    fix = MigrationRun.objects.filter(target=fixed.target).latest("pk")

    text = admin_client.get(reverse("fleet-dashboard")).content.decode()
    failures = text.split('id="fleet-failures"')[1].split("</table>")[0]
    entry = failures.split(f"#{first.pk}</a>")[1].split("</tr>")[0]
    assert f"put right by run #{fix.pk}" in re.sub("<[^>]+>", "", entry), entry
    still_run = MigrationRun.objects.get(target=still.target)
    entry = failures.split(f"#{still_run.pk}</a>")[1].split("</tr>")[0]
    assert "put right" not in entry


@pytest.mark.django_db
def test_a_refused_undo_is_called_an_undo(registered_tenant, settings):
    """An undo refused before anything ran says "Undo refused", not "Downgrade refused"."""
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "linear")
    tenant = registered_tenant("postgresql")
    assert migrate_tenants("--tenant", tenant.id, "--sync")[0] == 0
    # Moved behind the control plane's back: the undo no longer applies.
    engine = sa.create_engine(tenant.database.sqlalchemy_url(), poolclass=sa.pool.NullPool)
    with engine.begin() as connection:
        connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0002_projects'")
    engine.dispose()
    with pytest.raises(CommandError) as refused:
        migrate_tenants("--tenant", tenant.id, "--undo-last", "--yes", "--sync")
    assert refused.value.returncode == 2
    assert str(refused.value).startswith("Undo refused before anything ran"), refused.value
