"""What the record says is what the databases are: a worker's caches and a lost write of the
record never make it say otherwise (issue 16)."""

import io
import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from django.core.management import call_command
from django.db import connection

from tenants.models import MigrationRun, MigrationTarget
from tests.dispatch_fixtures import HEAD
from tests.workers import manage, process_env, qcluster, wait_for_runs

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


FIXTURES = Path(__file__).resolve().parent / "alembic_fixtures"
SLOW_CHAIN = ["s001_first", "s002_sleepy", "s003_last"]


def wait_until(condition, what, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@contextmanager
def control_plane_locked():
    """Take the SQLite control-plane database's write lock, as a long write elsewhere would: the
    workers' writes wait for it, then fail with "database is locked"."""
    locker = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None, timeout=30)
    locker.execute("BEGIN IMMEDIATE")
    try:
        yield
    finally:
        locker.execute("ROLLBACK")
        locker.close()


def run_with_the_record_lost_at_the_end(tenant, tmp_path, **worker_env):
    """A real worker migrates ``tenant`` with the slow fixture while the control-plane
    database is locked from the middle of its sleepy revision until the worker failed to record
    the outcome once; the tenant's database has committed every revision by then. Returns the
    qcluster's log."""
    signal_file = tmp_path / "inside"
    env = process_env(
        workers=1,
        TENANT_MIGRATIONS_DIR=FIXTURES / "slow",
        MIGRATOR_TEST_SIGNAL=signal_file,
        MIGRATOR_TEST_SLEEP=1,
        **worker_env,
    )
    env["DATABASE_URL"] += "?timeout=1"  # the worker's writes give up after a second
    log = tmp_path / "qcluster.log"
    with qcluster(env, log):
        call_command("migrate_tenants", "--tenant", tenant.id, stdout=io.StringIO())
        wait_until(signal_file.exists, "the slow revision to start")
        with control_plane_locked():
            wait_until(lambda: revision_of(tenant.database) == "s003_last", "the last commit")
            wait_until(
                lambda: "database is locked" in log.read_text(),
                "the worker to fail recording the outcome",
            )
        if worker_env.get("RUN_RECORD_RETRY_SECONDS") != "0":
            wait_for_runs(MigrationRun.objects.filter(target=tenant.target), timeout=60)
    return log.read_text()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_worker_records_its_outcome_once_the_control_plane_answers_again(
    registered_tenant, settings, tmp_path
):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "slow")
    tenant = registered_tenant("postgresql")
    log = run_with_the_record_lost_at_the_end(tenant, tmp_path, RUN_RECORD_RETRY_SECONDS="60")

    run = MigrationRun.objects.get(target=tenant.target)
    assert (run.status, run.applied, run.revision_after) == (
        "succeeded",
        SLOW_CHAIN,
        "s003_last",
    ), (
        run.error,
        log,
    )
    target = MigrationTarget.objects.get(pk=tenant.target.pk)
    assert (target.revision, target.status) == ("s003_last", "up_to_date")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_recovery_records_a_run_whose_outcome_was_lost_as_what_the_database_shows(
    registered_tenant, settings, tmp_path
):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "slow")
    tenant = registered_tenant("postgresql")
    # The worker gives up at once: the run stays running, its heartbeats stopped.
    log = run_with_the_record_lost_at_the_end(tenant, tmp_path, RUN_RECORD_RETRY_SECONDS="0")
    run = MigrationRun.objects.get(target=tenant.target)
    assert run.status == "running", log

    env = process_env(
        TENANT_MIGRATIONS_DIR=FIXTURES / "slow",
        RUN_HEARTBEAT_SECONDS=1,
        RUN_STALE_AFTER_SECONDS=2,
    )
    time.sleep(3)  # the heartbeat is older than RUN_STALE_AFTER_SECONDS
    result = manage("migrate_tenants", "--recover", env=env)
    assert result.returncode == 0, result.stderr
    said = result.stdout + result.stderr  # the command reports recovered runs on stderr
    name = tenant.target.name
    assert f"Run #{run.pk} for {name}: its worker stopped before recording it" in said
    assert "recorded as completed (3 revision(s) applied)" in said

    run.refresh_from_db()
    assert (run.status, run.applied) == ("succeeded", SLOW_CHAIN)
    assert (run.revision_before, run.revision_after) == ("", "s003_last")
    assert run.error == ""
    assert "rolled back" not in run.log and "recorded as completed" in run.log
    target = MigrationTarget.objects.get(pk=tenant.target.pk)
    assert (target.revision, target.status, target.last_error) == ("s003_last", "up_to_date", "")
