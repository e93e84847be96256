"""What the record says is what the databases are: a worker's caches and a lost write of the
record never make it say otherwise (issue 16)."""

import json

import pytest
import sqlalchemy as sa

from tenants.models import MigrationTarget
from tests.dispatch_fixtures import HEAD
from tests.workers import manage, process_env, qcluster

pytestmark = [pytest.mark.vault, pytest.mark.postgres]


def migrate(tenant, env, *args):
    """``migrate_tenants --tenant ID --wait --json``, as an operator types it: (exit code, the
    tenant's row)."""
    result = manage(
        "migrate_tenants",
        "--tenant",
        tenant.id,
        "--wait",
        "--json",
        "--timeout",
        "90",
        *args,
        env=env,
    )
    rows = json.loads(result.stdout or "[]")
    assert rows, (result.returncode, result.stdout, result.stderr)
    return result.returncode, rows[-1]


def revision_of(db):
    """The revision in the database's own alembic_version (None when it has none)."""
    engine = sa.create_engine(db.sqlalchemy_url(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            if not sa.inspect(connection).has_table("alembic_version"):
                return None
            rows = connection.exec_driver_sql("SELECT version_num FROM alembic_version")
            return ",".join(sorted(row[0] for row in rows)) or None
    finally:
        engine.dispose()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_database_moved_in_vault_is_migrated_within_the_cache_time(
    registered_tenant, pg_database, vault_secret, tmp_path
):
    tenant = registered_tenant("postgresql")
    # One worker, whose secret cache would still hold the old database for five minutes.
    env = process_env(workers=1, VAULT_CACHE_SECONDS=300)
    log = tmp_path / "qcluster.log"
    with qcluster(env, log):
        code, row = migrate(tenant, env)
        assert (code, row["status"], row["revision_after"]) == (0, "succeeded", HEAD)

        moved = pg_database()  # a new, empty database; the secret now points at it
        vault_secret(tenant.target.effective_vault_path, moved.secret())
        code, row = migrate(tenant, env)
    assert (code, row["status"]) == (0, "succeeded"), (row, log.read_text())
    assert row["revision_before"] in ("", None)
    assert row["revision_after"] == HEAD
    assert revision_of(moved) == HEAD
    target = MigrationTarget.objects.get(pk=tenant.target.pk)
    assert (target.revision, target.status) == (HEAD, "up_to_date")
