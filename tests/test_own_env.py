"""A team's own Alembic project: the env.py it brings meets the contract in the README
("Bringing your own Alembic project"), or every run says in plain words what is missing; the
record lists only revisions that committed."""

import io
import shutil
from pathlib import Path

import pytest
import sqlalchemy as sa
from django.core.management import call_command

from tenants.models import MigrationRun, MigrationTarget

pytestmark = [pytest.mark.vault, pytest.mark.postgres]

FIXTURES = Path(__file__).resolve().parent / "alembic_fixtures"
CHAIN = ["o001_widgets", "o002_gadgets", "o003_gizmos"]


def migrate_tenants(*args):
    """``manage.py migrate_tenants ...`` in this process: (exit code, what it printed)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("migrate_tenants", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue() + err.getvalue()


def database(tenant):
    """(revision in its alembic_version or None, its tables)."""
    engine = sa.create_engine(tenant.database.sqlalchemy_url(), poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as connection:
            tables = set(sa.inspect(connection).get_table_names())
            revision = None
            if "alembic_version" in tables:
                rows = connection.exec_driver_sql("SELECT version_num FROM alembic_version")
                revision = ",".join(row[0] for row in rows) or None
            return revision, tables - {"alembic_version"}
    finally:
        engine.dispose()


@pytest.mark.django_db
def test_the_env_py_alembic_init_writes_is_refused_in_plain_words(registered_tenant, settings):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "own_init")
    tenant = registered_tenant("postgresql")

    # The SQL preview works: the control plane sets sqlalchemy.url to the dialect, no host.
    code, said = migrate_tenants("--tenant", tenant.id, "--dry-run")
    assert code == 0, said
    assert "CREATE TABLE widgets" in said and "CREATE TABLE gizmos" in said

    # `manage.py check` (and every command, and the web process at start) says it too.
    from django.core import checks

    [warning] = [m for m in checks.run_checks() if m.id == "controlplane.W011"]
    assert "opens a connection of its own" in warning.msg

    code, said = migrate_tenants("--tenant", tenant.id, "--sync")
    assert code == 1, said
    run = MigrationRun.objects.get(target=tenant.target)
    assert (run.status, run.error_code, run.applied) == ("failed", "env_py_contract", [])
    assert "KeyError" not in run.error
    assert "own_init/env.py opens a connection of its own (engine_from_config" in run.error
    assert "config.attributes['connection']" in run.error
    assert "Bringing your own Alembic project" in run.error
    assert database(tenant) == (None, set())  # nothing ran


@pytest.mark.django_db
def test_the_cookbook_env_py_previews_migrates_and_records_only_what_committed(
    registered_tenant, settings
):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "own_cookbook")
    tenant = registered_tenant("postgresql")

    code, said = migrate_tenants("--tenant", tenant.id, "--dry-run")
    assert code == 0, said
    assert "CREATE TABLE widgets" in said

    code, said = migrate_tenants("--tenant", tenant.id, "--sync")
    assert code == 0, said
    assert database(tenant) == ("o003_gizmos", {"widgets", "gadgets", "gizmos"})

    # Down to base: o003 and o002 are reverted, then o001's downgrade fails. Each revision had
    # its own transaction (the control plane asks for it when env.py does not say).
    code, said = migrate_tenants("--tenant", tenant.id, "--to", "base", "--yes", "--sync")
    assert code == 1, said
    run = MigrationRun.objects.filter(target=tenant.target).latest("pk")
    assert (run.kind, run.status) == ("downgrade", "failed")
    assert run.applied == ["o003_gizmos", "o002_gadgets"]
    assert run.revision_after == "o001_widgets"
    assert "Reverting revision o001_widgets failed" in run.error
    assert database(tenant) == ("o001_widgets", {"widgets"})
    target = MigrationTarget.objects.get(pk=tenant.target.pk)
    assert (target.revision, target.status) == ("o001_widgets", "failed")


@pytest.mark.django_db
def test_one_transaction_for_the_whole_run_is_recorded_as_nothing_kept(
    registered_tenant, settings, tmp_path
):
    """An env.py that asks for one transaction around the whole run: the failed downgrade takes
    everything back with it, and the record lists nothing as reverted."""
    location = tmp_path / "single"
    shutil.copytree(FIXTURES / "own_cookbook", location, ignore=shutil.ignore_patterns("__py*"))
    env_py = location / "env.py"
    env_py.write_text(
        env_py.read_text().replace(
            "context.configure(connection=connection, target_metadata=target_metadata)",
            "context.configure(\n        connection=connection,\n        "
            "target_metadata=target_metadata,\n        transaction_per_migration=False,\n    )",
        )
    )
    assert "transaction_per_migration=False" in env_py.read_text()
    settings.TENANT_MIGRATIONS_DIR = str(location)
    tenant = registered_tenant("postgresql")
    assert migrate_tenants("--tenant", tenant.id, "--sync")[0] == 0

    code, said = migrate_tenants("--tenant", tenant.id, "--to", "base", "--yes", "--sync")
    assert code == 1, said
    run = MigrationRun.objects.filter(target=tenant.target).latest("pk")
    assert (run.status, run.applied, run.revision_after) == ("failed", [], "o003_gizmos")
    assert "The database stands at o003_gizmos" in run.error
    assert "o003_gizmos, o002_gadgets ran before it in the same transaction" in run.error
    assert database(tenant) == ("o003_gizmos", {"widgets", "gadgets", "gizmos"})


@pytest.mark.django_db
def test_the_readmes_minimal_env_py_previews_and_migrates(registered_tenant, settings, tmp_path):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("A minimal `env.py` that works for the control plane", 1)[1]
    source = section.split("```python\n", 1)[1].split("```", 1)[0]
    location = tmp_path / "minimal"
    shutil.copytree(FIXTURES / "own_cookbook", location, ignore=shutil.ignore_patterns("__py*"))
    (location / "env.py").write_text(source)
    settings.TENANT_MIGRATIONS_DIR = str(location)
    tenant = registered_tenant("postgresql")

    code, said = migrate_tenants("--tenant", tenant.id, "--dry-run")
    assert code == 0 and "CREATE TABLE gizmos" in said, said
    code, said = migrate_tenants("--tenant", tenant.id, "--sync")
    assert code == 0, said
    run = MigrationRun.objects.get(target=tenant.target)
    assert (run.status, run.applied) == ("succeeded", CHAIN)
    assert database(tenant) == ("o003_gizmos", {"widgets", "gadgets", "gizmos"})
