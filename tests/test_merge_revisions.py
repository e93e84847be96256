"""Histories with merge revisions (`alembic merge heads`), as real projects have them: a merge
revision's upgrade() and downgrade() are both `pass`, and a downgrade goes through it."""

import io
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from django.core.management import call_command

from tenants.models import MigrationRun, MigrationTarget

pytestmark = [pytest.mark.vault, pytest.mark.postgres]

FIXTURES = Path(__file__).resolve().parent / "alembic_fixtures"

# What `alembic merge heads -m "merging two heads"` writes.
MERGE = '''"""merging two heads"""

revision = "h003_merge"
down_revision = ("h002_left", "h002_right")
branch_labels = None
depends_on = None


def upgrade():
    pass


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


def database(tenant):
    engine = sa.create_engine(tenant.database.sqlalchemy_url(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            tables = set(sa.inspect(connection).get_table_names())
            rows = connection.exec_driver_sql("SELECT version_num FROM alembic_version")
            return ",".join(sorted(row[0] for row in rows)), tables - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.mark.django_db
def test_a_downgrade_goes_through_a_merge_revision(registered_tenant, settings, tmp_path):
    location = tmp_path / "merged"
    shutil.copytree(FIXTURES / "two_heads", location, ignore=shutil.ignore_patterns("__py*"))
    shutil.copy(FIXTURES / "own_cookbook" / "env.py", location / "env.py")
    (location / "versions" / "h003_merge.py").write_text(MERGE)
    settings.TENANT_MIGRATIONS_DIR = str(location)
    tenant = registered_tenant("postgresql")
    code, said = migrate_tenants("--tenant", tenant.id, "--sync")
    assert code == 0, said
    assert database(tenant) == ("h003_merge", {"base_things", "left_things", "right_things"})

    # The preview, then the downgrade: the merge reverts nothing of its own; both branches go.
    code, said = migrate_tenants("--tenant", tenant.id, "--to", "h001_base", "--dry-run")
    assert code == 0, said
    assert "downgrade() is empty" not in said
    code, said = migrate_tenants("--tenant", tenant.id, "--to", "h001_base", "--yes", "--sync")
    assert code == 0, said
    run = MigrationRun.objects.filter(target=tenant.target).latest("pk")
    assert (run.kind, run.status, run.revision_after) == ("downgrade", "succeeded", "h001_base")
    assert database(tenant) == ("h001_base", {"base_things"})
    assert MigrationTarget.objects.get(pk=tenant.target.pk).revision == "h001_base"

    # Undo the downgrade: back up through the merge.
    code, said = migrate_tenants("--tenant", tenant.id, "--undo-last", "--yes", "--sync")
    assert code == 0, said
    assert database(tenant) == ("h003_merge", {"base_things", "left_things", "right_things"})


@pytest.mark.django_db
def test_a_run_that_ends_at_base_says_base_not_unknown(registered_tenant, settings):
    """`--undo-last` after a first migration takes the target to base; the table says where it
    ended ("-> base"), not "-> ?", which reads as "not known"."""
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "linear")
    tenant = registered_tenant("postgresql")
    assert migrate_tenants("--tenant", tenant.id, "--sync")[0] == 0
    code, said = migrate_tenants("--tenant", tenant.id, "--undo-last", "--yes", "--sync")
    assert code == 0, said
    line = next(line for line in said.splitlines() if line.startswith(tenant.id + " "))
    assert "0004_accounts_display_name -> base" in line, said
