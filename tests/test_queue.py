"""The queue, the locks and the edges under faults (issue 17): no run is lost, none blocks its
target for good, none is declared dead while it lives. Each test drives the real path: real
``qcluster`` and ``manage.py`` processes, the real Redis and ORM brokers, signals sent to real
processes, real OpenBao, PostgreSQL and MariaDB. docs/reliability.md lists what each shows."""

import io
import os
import signal
import socket
import subprocess
import time
from contextlib import redirect_stderr

import pytest
from django.core.management import call_command

from migrator import runner
from tenants.models import MigrationRun, MigrationTarget
from tests.test_dispatch import api_tokens  # noqa: F401 - a fixture
from tests.test_reliability import FIXTURES, _hold_lock_then_die
from tests.test_settings_checks import run_manage
from tests.workers import manage, process_env

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


class ThrowawayRedis:
    """A redis-server of our own on a free port, to stop and start for real (never the shared
    one on 6379)."""

    def __init__(self):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = None

    def start(self):
        import redis

        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                redis.Redis.from_url(self.url, socket_connect_timeout=1).ping()
                return self
            except redis.exceptions.ConnectionError:
                assert time.monotonic() < deadline, "the throwaway redis-server did not start"
                time.sleep(0.1)

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=20)


@pytest.fixture
def throwaway_redis():
    from shutil import which

    from tests import services

    if which("redis-server") is None:
        services.unavailable("redis", "no redis-server binary to start a throwaway one")
    server = ThrowawayRedis().start()
    yield server
    server.stop()


@pytest.fixture
def redis_broker(throwaway_redis, settings, monkeypatch):
    """This process's django-q2 broker is the throwaway Redis (as with REDIS_URL set)."""
    from django_q.conf import Conf

    settings.REDIS_URL = throwaway_redis.url
    monkeypatch.setattr(Conf, "ORM", None)
    monkeypatch.setattr(Conf, "REDIS", throwaway_redis.url)
    return throwaway_redis


# --- item 1: a run is queued only when the broker took its message ---------------------------


@pytest.mark.django_db(transaction=True)
def test_api_with_the_broker_down_answers_503_and_leaves_nothing_queued(
    client,
    api_tokens,  # noqa: F811
    tenant_factory,
    redis_broker,
):
    tenant = tenant_factory(auto_migrate=False)
    redis_broker.stop()
    url = f"/api/tenants/{tenant.id}/migrate"
    auth = {"Authorization": f"Bearer {api_tokens['good']}"}

    def post():
        return client.post(url, headers=auth)

    response = post()
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "failed" and body["error_code"] == "queue_unavailable"
    assert (
        f"queue broker at redis://127.0.0.1:{redis_broker.port}/0 refused the task"
        in (body["detail"])
    )
    assert "nothing ran" in body["error"]
    assert not MigrationRun.objects.filter(status__in=["queued", "running"]).exists()
    # The next POST is a new attempt, not "already queued" for a run that will never execute.
    again = post()
    assert again.status_code == 503 and again.json()["created"] is True
    assert again.json()["id"] != body["id"]
    # The broker is back: the next POST is queued.
    redis_broker.start()
    queued = post()
    assert queued.status_code == 202 and queued.json()["status"] == "queued"


@pytest.mark.django_db(transaction=True)
def test_cli_with_the_broker_down_says_so_and_exits_1(tenant_factory, throwaway_redis):
    tenant = tenant_factory(auto_migrate=False)
    throwaway_redis.stop()
    result = manage(
        "migrate_tenants",
        "--target",
        tenant.target.name,
        env=process_env(REDIS_URL=throwaway_redis.url),
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"for {tenant.target.name} was not queued: The queue broker at redis://" in (
        result.stderr
    )
    assert "Run it again when the broker is back" in result.stderr
    [run] = MigrationRun.objects.filter(target=tenant.target)
    assert (run.status, run.error_code) == ("failed", "queue_unavailable")


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
