"""Faults and bad input, each through the real pipeline (a run, the task, Vault, Alembic, a real
database): the user gets a clear, specific error, the target is left in a known state, and
nothing else is touched. docs/reliability.md lists these cases with what the user sees."""

import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from migrator import runner
from migrator.tasks import recover_stale_runs, run_migration
from tenants import actions
from tenants.models import MigrationRun, MigrationTarget, Trigger
from tests import services
from tests.dispatch_fixtures import HEAD

pytestmark = [pytest.mark.django_db, pytest.mark.vault]

FIXTURES = Path(__file__).parent / "alembic_fixtures"


def migrate_once(target, **kwargs):
    """Queue one run for ``target`` and execute it here; return the run as recorded."""
    kwargs.setdefault("trigger", Trigger.COMMAND)
    [dispatch] = actions.do_enqueue_runs([target], enqueue=False, **kwargs)
    run_migration(dispatch.run.pk)
    dispatch.run.refresh_from_db()
    dispatch.run.target.refresh_from_db()
    return dispatch.run


@pytest.fixture
def pg_tenant(registered_tenant):
    return registered_tenant("postgresql")


# --- outages --------------------------------------------------------------------------------


@pytest.fixture
def throwaway_vault(settings):
    """A second OpenBao of our own, to stop or seal without touching the session's."""

    server = services.OpenBaoServer().start()
    settings.VAULT_ADDR, settings.VAULT_TOKEN = server.addr, server.root_token
    yield server
    server.stop()


def test_vault_down_is_retryable_and_backs_off(
    pg_tenant, throwaway_vault, settings, django_capture_on_commit_callbacks
):
    throwaway_vault.stop()
    settings.RUN_RETRY_BACKOFF_SECONDS = 30
    before = timezone.now()
    with django_capture_on_commit_callbacks(execute=True):
        run = migrate_once(pg_tenant.target)
    assert run.status == "failed"
    assert run.error_code == "vault_unavailable" and run.retryable is True
    assert "VAULT_ADDR" in run.error
    assert run.target.status == "failed"
    retry = MigrationRun.objects.get(target=pg_tenant.target, attempt=2)
    assert retry.status == "queued"
    assert (
        before + timedelta(seconds=29) <= retry.not_before <= timezone.now() + timedelta(seconds=31)
    )
    from django_q.models import Schedule

    assert Schedule.objects.filter(name=f"retry-run-{retry.pk}").exists()


def test_retries_back_off_and_stop_after_the_last_attempt(pg_tenant, throwaway_vault, settings):
    throwaway_vault.stop()
    settings.RUN_MAX_ATTEMPTS = 3
    assert actions.retry_delay_seconds(1) * 2 == actions.retry_delay_seconds(2)
    migrate_once(pg_tenant.target)
    for attempt in (2, 3):
        retry = MigrationRun.objects.get(target=pg_tenant.target, attempt=attempt)
        run_migration(retry.pk)
    assert MigrationRun.objects.filter(target=pg_tenant.target).count() == 3
    assert not MigrationRun.objects.filter(status="queued").exists()


def test_vault_sealed_says_so(pg_tenant, throwaway_vault):
    throwaway_vault.client().sys.seal()
    run = migrate_once(pg_tenant.target)
    assert run.error_code == "vault_unavailable"
    assert "sealed" in run.error


def test_unreachable_database_host_honours_the_connect_timeout(
    registered_tenant, vault_secret, settings
):
    settings.DATABASE_CONNECT_TIMEOUT = 2
    tenant = registered_tenant("postgresql")
    port = services.free_port()
    vault_secret(tenant.target.vault_path, tenant.database.secret(port=str(port)))
    started = time.monotonic()
    run = migrate_once(tenant.target)
    assert time.monotonic() - started < 15
    assert run.error_code == "database_unreachable" and run.retryable
    assert f"127.0.0.1:{port}" in run.error


def test_host_with_a_typo_is_unreachable_naming_the_host(registered_tenant, vault_secret, settings):
    settings.DATABASE_CONNECT_TIMEOUT = 3
    tenant = registered_tenant("mysql")
    vault_secret(tenant.target.vault_path, tenant.database.secret(host="mariadb-primray.invalid"))
    run = migrate_once(tenant.target)
    assert run.error_code == "database_unreachable"
    assert "mariadb-primray.invalid" in run.error


@pytest.mark.parametrize("provider", ["postgresql", "mysql"])
def test_database_refusing_the_admin_user(provider, registered_tenant, vault_secret, request):
    if (
        provider == "postgresql"
        and not request.getfixturevalue("postgres_server").password_auth_enforced()
    ):
        services.unavailable("postgresql", "it does not check passwords: " + services.PG_HBA_RULE)
    tenant = registered_tenant(provider)
    wrong = "not-the-password-" + "x" * 8
    vault_secret(tenant.target.vault_path, tenant.database.secret(admin_password=wrong))
    run = migrate_once(tenant.target)
    assert run.error_code == "database_auth_failed" and run.retryable is False
    assert tenant.database.admin_username in run.error
    assert f"secret/data/database/{tenant.target.vault_path}" in run.error
    assert wrong not in run.error
    assert not MigrationRun.objects.filter(attempt=2).exists()  # no blind retry


def test_lock_held_by_someone_else_is_not_a_schema_failure(pg_tenant, settings):
    import psycopg

    from migrator.providers.postgresql import LOCK_KEY

    settings.MIGRATION_LOCK_TIMEOUT = 1
    db = pg_tenant.database
    holder = psycopg.connect(host=db.host, port=db.port, user="postgres", dbname=db.database)
    holder.execute("SELECT pg_advisory_lock(%s)", (LOCK_KEY,))
    try:
        run = migrate_once(pg_tenant.target)
    finally:
        holder.close()
    assert run.error_code == "locked" and run.retryable
    assert "locked by another run" in run.error
    assert run.target.status != "failed"
    assert MigrationRun.objects.filter(target=pg_tenant.target, attempt=2, status="queued").exists()


# --- bad input ------------------------------------------------------------------------------


def test_secret_missing_keys_names_them_and_never_values(registered_tenant, vault_secret):
    tenant = registered_tenant("postgresql")
    secret = tenant.database.secret()
    del secret["admin_password"], secret["host"]
    vault_secret(tenant.target.vault_path, secret)
    run = migrate_once(tenant.target)
    assert run.error_code == "secret_incomplete"
    assert "admin_password" in run.error and "host" in run.error
    assert tenant.database.app_password not in run.error


def test_port_that_is_not_a_number(registered_tenant, vault_secret):
    tenant = registered_tenant("postgresql")
    vault_secret(tenant.target.vault_path, tenant.database.secret(port="54x2"))
    run = migrate_once(tenant.target)
    assert run.error_code == "secret_incomplete"
    assert "port" in run.error and "54x2" not in run.error


def test_unknown_revision_leaves_the_target_untouched(pg_tenant):
    first = migrate_once(pg_tenant.target, revision="0002_projects")
    assert first.revision_after == "0002_projects"
    run = migrate_once(pg_tenant.target, revision="9999_nope")
    assert run.error_code == "revision_not_found"
    assert "9999_nope" in run.error
    assert run.target.revision == "0002_projects"


def test_downgrade_below_base_is_refused(pg_tenant):
    migrate_once(pg_tenant.target, revision="0001_accounts")
    run = migrate_once(pg_tenant.target, kind="downgrade", revision="-5")
    assert run.status == "failed"
    assert run.error
    assert runner.current(_target_of(pg_tenant)).revision == "0001_accounts"


def test_two_heads_in_the_script_directory(pg_tenant, settings):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "two_heads")
    run = migrate_once(pg_tenant.target)
    assert run.error_code == "multiple_heads"
    assert "h002_left" in run.error and "h002_right" in run.error


def test_failing_revision_leaves_the_target_at_the_last_good_one(pg_tenant, settings):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "failing")
    run = migrate_once(pg_tenant.target)
    assert run.error_code == "migration_failed"
    assert "f003_broken" in run.error
    assert run.revision_after == "f002_gadgets"
    assert run.applied == ["f001_widgets", "f002_gadgets"]
    assert run.target.revision == "f002_gadgets" and run.target.status == "failed"


@pytest.mark.parametrize(
    "database", ["x; DROP DATABASE postgres; --", "t` ; DROP DATABASE mysql; -- ", "a' OR '1'='1"]
)
def test_sql_injection_in_the_database_name_fails_cleanly(
    database, registered_tenant, vault_secret, postgres_server
):
    tenant = registered_tenant("postgresql")
    vault_secret(tenant.target.vault_path, tenant.database.secret(database=database))
    run = migrate_once(tenant.target)
    assert run.status == "failed"
    assert run.error_code in ("database_not_found", "database_unreachable", "database_auth_failed")
    with postgres_server.connect() as conn:  # the server and its databases are all still there
        assert (
            conn.execute("SELECT count(*) FROM pg_database WHERE datname = 'postgres'").fetchone()[
                0
            ]
            == 1
        )


def test_odd_tenant_ids_are_rejected_before_anything_runs(target_factory):
    from django.core.exceptions import ValidationError

    from tenants.models import Tenant

    for bad in ("acme'; DROP TABLE tenants_tenant; --", "../shared", "acme corp", "ACME"):
        tenant = Tenant(id=bad, name="x", strategy="dedicated", target=target_factory())
        with pytest.raises(ValidationError):
            tenant.full_clean()
    assert not MigrationRun.objects.exists()


# --- isolation, resume, skip ------------------------------------------------------------------


def test_failed_only_reruns_what_failed(registered_tenant, vault_secret):
    from django.core.management import call_command

    good = registered_tenant("postgresql")
    bad = registered_tenant("missing-secret")
    with pytest.raises(SystemExit):
        call_command(
            "migrate_tenants",
            "--all",
            "--sync",
            stdout=open(os.devnull, "w"),
            stderr=open(os.devnull, "w"),
        )
    assert MigrationTarget.objects.get(pk=good.target_id).status == "up_to_date"
    vault_secret(bad.target.vault_path, registered_tenant("postgresql").database.secret())
    call_command(
        "migrate_tenants",
        "--failed",
        "--sync",
        stdout=open(os.devnull, "w"),
        stderr=open(os.devnull, "w"),
    )
    assert MigrationRun.objects.filter(target=good.target).count() == 1
    latest = MigrationRun.objects.filter(target=bad.target).first()
    assert latest.status == "succeeded" and latest.revision_after == HEAD


def test_target_at_head_is_skipped_in_milliseconds(pg_tenant):
    migrate_once(pg_tenant.target)
    run = migrate_once(pg_tenant.target)
    assert run.status == "skipped" and run.applied == []
    assert run.duration_ms < 500


def test_the_record_decides_which_read_comes_first_never_what_runs(pg_tenant):
    """A target recorded behind is locked before alembic_version is read (one read); one
    recorded at head is read without the lock first (a no-op takes no lock); and a record
    that is wrong changes nothing of what runs."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    sent = []

    def record(conn, cursor, statement, *args):
        if "alembic_version" in statement or "advisory" in statement:
            sent.append(" ".join(statement.split())[:40])

    read = "SELECT version_num FROM alembic_version"
    event.listen(Engine, "before_cursor_execute", record)
    try:
        first = migrate_once(pg_tenant.target)  # recorded: never migrated
        at_first, sent[:] = list(sent), []
        again = migrate_once(pg_tenant.target)  # recorded: at head
        at_head, sent[:] = list(sent), []
        # The record says behind, the database is at head: read under the lock, nothing runs.
        MigrationTarget.objects.filter(pk=pg_tenant.target.pk).update(revision="")
        stale = migrate_once(MigrationTarget.objects.get(pk=pg_tenant.target.pk))
        at_stale = list(sent)
    finally:
        event.remove(Engine, "before_cursor_execute", record)

    assert first.status == "succeeded" and first.revision_after == HEAD
    assert "advisory" in at_first[0] and at_first.count(read) == 1
    assert again.status == "skipped" and at_head == [read]
    assert stale.status == "skipped" and stale.applied == [] and stale.revision_after == HEAD
    assert "advisory" in at_stale[0] and at_stale.count(read) == 1
    assert stale.target.revision == HEAD


def test_cancelled_run_is_never_executed(pg_tenant):
    [dispatch] = actions.do_enqueue_runs([pg_tenant.target], trigger=Trigger.ADMIN, enqueue=False)
    assert actions.do_cancel_run(dispatch.run)
    assert run_migration(dispatch.run.pk)["status"] == "not-queued"
    assert runner.current(_target_of(pg_tenant)).revision is None


# --- crashes --------------------------------------------------------------------------------


def _target_of(tenant):
    from migrator.secrets import get_secrets_manager
    from migrator.targets import Target

    record = tenant.target
    return Target(
        record.name,
        get_secrets_manager().migration_credentials(record.vault_path, provider=record.provider),
    )


def _hold_lock_then_die(tenant, signal_file, extra_env=None):
    """A separate process upgrading ``tenant`` with the slow fixture; returns it once it is inside
    the sleepy revision (holding the target's lock)."""
    from tests.workers import ROOT, process_env

    env = process_env(
        TENANT_MIGRATIONS_DIR=str(FIXTURES / "slow"),
        MIGRATOR_TEST_SIGNAL=str(signal_file),
        MIGRATOR_TEST_SLEEP="60",
        **(extra_env or {}),
    )
    process = subprocess.Popen(
        [sys.executable, "manage.py", "migrate_tenants", "--target", tenant.target.name, "--sync"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not signal_file.exists():
        assert process.poll() is None, "the migrating process exited early"
        assert time.monotonic() < deadline, "the slow revision never started"
        time.sleep(0.1)
    return process


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("provider", ["postgresql", "mysql"])
def test_killed_worker_run_is_recovered_and_the_lock_was_released(
    provider, registered_tenant, settings, tmp_path
):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "slow")
    settings.MIGRATION_LOCK_TIMEOUT = 2
    tenant = registered_tenant(provider)
    process = _hold_lock_then_die(tenant, tmp_path / "inside", {"RUN_HEARTBEAT_SECONDS": "1"})
    run = MigrationRun.objects.get(target=tenant.target)
    assert run.status == "running"
    os.killpg(process.pid, signal.SIGKILL)  # the worker's host dies: no cleanup of any kind
    process.wait()

    settings.RUN_STALE_AFTER_SECONDS = 2
    time.sleep(3)
    lines = recover_stale_runs()
    assert lines and f"Run #{run.pk} for {tenant.target.name} interrupted" in lines[0]
    run.refresh_from_db()
    assert run.status == "interrupted" and run.error_code == "interrupted"
    assert "now stands at s001_first" in run.error
    target = MigrationTarget.objects.get(pk=tenant.target_id)
    assert (target.status, target.revision) == ("failed", "s001_first")

    # The database released the lock with the dead connection: the next run goes straight in.
    started = time.monotonic()
    rerun = migrate_once(target)
    assert time.monotonic() - started < 10
    assert rerun.error_code != "locked"
    if provider == "postgresql":
        assert "rolled back with its transaction" in run.error
        assert run.applied == ["s001_first"]  # committed before the worker died
        assert rerun.status == "succeeded", rerun.error
        assert rerun.applied == ["s002_sleepy", "s003_last"]
    else:
        # MariaDB committed the killed revision's CREATE TABLE: the product says so, twice.
        assert "may be partly applied" in run.error
        assert rerun.status == "failed"
        assert "already exists" in rerun.error and "partly applied" in rerun.error


@pytest.mark.django_db(transaction=True)
def test_live_run_with_heartbeats_is_not_recovered(pg_tenant, settings):
    [dispatch] = actions.do_enqueue_runs([pg_tenant.target], trigger=Trigger.ADMIN, enqueue=False)
    actions.do_start_run(dispatch.run.pk, worker_host="elsewhere:1")
    settings.RUN_STALE_AFTER_SECONDS = 60
    assert recover_stale_runs() == []
    MigrationRun.objects.filter(pk=dispatch.run.pk).update(
        heartbeat_at=timezone.now() - timedelta(seconds=120)
    )
    [line] = recover_stale_runs()
    assert "now at base" in line


# --- access ---------------------------------------------------------------------------------


def test_admin_keeps_csrf_protection(django_user_model, tenant_factory):
    from django.test import Client
    from django.urls import reverse

    tenant = tenant_factory(auto_migrate=False)
    django_user_model.objects.create_superuser("root", password="pw")
    client = Client(enforce_csrf_checks=True)
    client.login(username="root", password="pw")
    response = client.post(
        reverse("admin:tenants_tenant_changelist"),
        {"action": "migrate_to_head", "_selected_action": [tenant.pk]},
    )
    assert response.status_code == 403
    assert not MigrationRun.objects.exists()
