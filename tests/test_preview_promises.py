"""A preview that cannot render a revision says which one, and promises that the run is not
affected only when the cause is offline mode's own limit. spiff-arena's downgrades use MySQL's
TINYINT (PostgreSQL has no such type) and drop_constraint(None): the run fails on them too."""

import io
import json
import shutil
from pathlib import Path

import pytest
from django.core.management import call_command

from tenants.models import MigrationRun

pytestmark = [pytest.mark.vault, pytest.mark.postgres]

FIXTURES = Path(__file__).resolve().parent / "alembic_fixtures"

MYSQL_TYPE = '''"""A column of a MySQL-only type."""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "o004_tinyint"
down_revision = "o003_gizmos"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("gizmos", sa.Column("has_lanes", mysql.TINYINT(), nullable=True))


def downgrade():
    op.drop_column("gizmos", "has_lanes")
'''


def migrate_tenants(*args):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("migrate_tenants", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_a_type_the_database_does_not_have_is_not_promised_to_run(
    registered_tenant, settings, tmp_path
):
    location = tmp_path / "team"
    shutil.copytree(FIXTURES / "own_cookbook", location, ignore=shutil.ignore_patterns("__py*"))
    (location / "versions" / "o004_tinyint.py").write_text(MYSQL_TYPE)
    settings.TENANT_MIGRATIONS_DIR = str(location)
    tenant = registered_tenant("postgresql")

    code, out, err = migrate_tenants("--tenant", tenant.id, "--dry-run", "--json")
    [row] = json.loads(out)
    assert row["sql"] is None
    assert "o004_tinyint.py" in row["no_sql"], row["no_sql"]
    assert "TINYINT" in row["no_sql"]
    assert "not affected" not in row["no_sql"]
    assert "will fail" in row["no_sql"]
    assert " at 0x" not in row["no_sql"]  # no object address

    # What the preview said: the run fails on it.
    code, out, err = migrate_tenants("--tenant", tenant.id, "--sync")
    assert code == 1, out + err
    run = MigrationRun.objects.get(target=tenant.target)
    assert (run.status, run.revision_after) == ("failed", "o003_gizmos")
    assert "o004_tinyint" in run.error
