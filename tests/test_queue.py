"""The queue, the locks and the edges under faults (issue 17): no run is lost, none blocks its
target for good, none is declared dead while it lives. Each test drives the real path: real
``qcluster`` and ``manage.py`` processes, the real Redis and ORM brokers, signals sent to real
processes, real OpenBao, PostgreSQL and MariaDB. docs/reliability.md lists what each shows."""

import io
import os
import signal
import time
from contextlib import redirect_stderr

import pytest
from django.core.management import call_command

from migrator import runner
from tenants.models import MigrationRun, MigrationTarget
from tests.test_reliability import FIXTURES, _hold_lock_then_die
from tests.test_settings_checks import run_manage

pytestmark = [pytest.mark.django_db, pytest.mark.vault]


@pytest.fixture(autouse=True)
def _fresh_runner():
    runner.reset()
    yield
    runner.reset()


def recover():
    """``manage.py migrate_tenants --recover`` in this process; returns what it printed."""
    err = io.StringIO()
    with redirect_stderr(err):
        call_command("migrate_tenants", "--recover", stderr=err)
    return err.getvalue()


# --- item 5: live runs are not declared dead ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("provider", ["postgresql", "mysql"])
def test_silent_run_that_holds_the_lock_is_left_running(
    provider, registered_tenant, settings, tmp_path
):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "slow")
    tenant = registered_tenant(provider)
    # The worker's heartbeat thread is starved (a revision holding the GIL does that): it
    # beats once, at the start, and never again while the revision runs.
    process = _hold_lock_then_die(
        tenant,
        tmp_path / "inside",
        {"RUN_HEARTBEAT_SECONDS": "3600", "RUN_STALE_AFTER_SECONDS": "7200"},
    )
    try:
        run = MigrationRun.objects.get(target=tenant.target)
        settings.RUN_STALE_AFTER_SECONDS = 1
        time.sleep(2)
        printed = recover()
        assert f"Run #{run.pk} for {tenant.target.name}" in printed
        assert "migration lock is still held" in printed and "left running" in printed
        run.refresh_from_db()
        assert run.status == "running"
        assert MigrationTarget.objects.get(pk=tenant.target_id).status == "migrating"
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # now the worker really dies
        process.wait()
    printed = recover()
    assert f"Run #{run.pk} for {tenant.target.name} interrupted" in printed
    run.refresh_from_db()
    assert run.status == "interrupted"


def test_check_rejects_a_stale_window_not_longer_than_the_heartbeat():
    result = run_manage(
        "check",
        SECRET_KEY="k" * 50,
        VAULT_TOKEN="x",
        RUN_HEARTBEAT_SECONDS="15",
        RUN_STALE_AFTER_SECONDS="15",
    )
    assert result.returncode != 0
    assert "controlplane.E031" in result.stderr
    assert "RUN_STALE_AFTER_SECONDS (15) must be more than RUN_HEARTBEAT_SECONDS (15)" in (
        result.stderr
    )
    fine = run_manage("check", SECRET_KEY="k" * 50, VAULT_TOKEN="x", RUN_STALE_AFTER_SECONDS="16")
    assert fine.returncode == 0, fine.stderr
