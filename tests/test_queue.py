"""The queue, the locks and the edges under faults (issue 17): no run is lost, none blocks its
target for good, none is declared dead while it lives. Each test drives the real path: real
``qcluster`` and ``manage.py`` processes, the real Redis and ORM brokers, signals sent to real
processes, real OpenBao, PostgreSQL and MariaDB. docs/reliability.md lists what each shows."""

import io
import os
import signal
import subprocess
import time
from contextlib import redirect_stderr

import pytest
from django.core.management import call_command

from controlplane.devservices import free_port
from tenants.models import MigrationRun, MigrationTarget
from tests.test_dispatch import api_tokens  # noqa: F401 - a fixture
from tests.test_reliability import FIXTURES, _hold_lock_then_die
from tests.test_settings_checks import run_manage
from tests.workers import manage, process_env

pytestmark = [pytest.mark.django_db, pytest.mark.vault]


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
        self.port = free_port()
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


# --- item 1: queued runs can be cancelled ----------------------------------------------------


def test_queued_runs_are_cancelled_from_the_api_the_admin_and_the_command(
    client,
    api_tokens,  # noqa: F811
    tenant_factory,
    django_user_model,
):
    from django.urls import reverse

    from migrator.tasks import run_migration
    from tenants import actions
    from tenants.models import Trigger

    tenants = [tenant_factory(auto_migrate=False) for _ in range(3)]
    runs = [
        d.run
        for d in actions.do_enqueue_runs(
            [t.target for t in tenants], trigger=Trigger.API, enqueue=False
        )
    ]

    # The API, with the run-migrations permission.
    url = f"/api/runs/{runs[0].pk}/cancel"
    assert client.post(url).status_code == 401
    denied = client.post(url, headers={"Authorization": f"Bearer {api_tokens['no-permission']}"})
    assert denied.status_code == 403
    auth = {"Authorization": f"Bearer {api_tokens['good']}"}
    response = client.post(url, headers=auth)
    assert response.status_code == 200, response.content
    assert response.json()["status"] == "cancelled"
    again = client.post(url, headers=auth)
    assert again.status_code == 409
    assert again.json()["detail"] == (
        f"Run #{again.json()['id']} has already ended (cancelled): only a queued run can be "
        "cancelled."
    )

    # The admin: an action on runs, and one on targets.
    root = django_user_model.objects.create_superuser("root", password="pw")
    client.force_login(root)
    page = client.post(
        reverse("admin:tenants_migrationrun_changelist"),
        {"action": "cancel_selected_runs", "_selected_action": [runs[1].pk]},
        follow=True,
    )
    assert f"Run #{runs[1].pk} for {tenants[1].target.name} cancelled; nothing ran." in (
        page.content.decode()
    )

    # The command, with the usual selection flags.
    err = io.StringIO()
    call_command("migrate_tenants", "--cancel", "--target", tenants[2].target.name, stderr=err)
    assert f"Run #{runs[2].pk} for {tenants[2].target.name} cancelled; nothing ran." in (
        err.getvalue()
    )

    for run in runs:
        run.refresh_from_db()
        assert (run.status, run.error_code) == ("cancelled", "cancelled")
        # The broker's message, when a worker reads it, does nothing.
        assert run_migration(run.pk)["status"] == "not-queued"
    # The targets are free: the next trigger starts a new run, not "already queued".
    [fresh] = actions.do_enqueue_runs([tenants[0].target], trigger=Trigger.API, enqueue=False)
    assert fresh.created and fresh.run.status == "queued"

    # On targets: the action cancels the target's queued run.
    page = client.post(
        reverse("admin:tenants_migrationtarget_changelist"),
        {"action": "cancel_queued_runs", "_selected_action": [tenants[0].target.pk]},
        follow=True,
    )
    assert f"Run #{fresh.run.pk} for {tenants[0].target.name} cancelled" in page.content.decode()


def _migrate_in_a_process(names, signal_file, **env):
    """``migrate_tenants --target NAMES --sync`` with the slow fixture in a process of its own;
    returns it once the sleepy revision of the first target runs (holding its lock)."""
    import subprocess
    import sys

    from tests.workers import ROOT

    process = subprocess.Popen(
        [sys.executable, "manage.py", "migrate_tenants", "--target", *names, "--sync"],
        cwd=ROOT,
        env=process_env(
            TENANT_MIGRATIONS_DIR=str(FIXTURES / "slow"),
            MIGRATOR_TEST_SIGNAL=str(signal_file),
            **env,
        ),
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


# --- item 1: a queued run that no worker takes is closed, and sent again ------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_messages_lost_with_a_redis_restart_are_abandoned_and_sent_again(
    registered_tenant, throwaway_redis, tmp_path
):
    from tests.dispatch_fixtures import HEAD
    from tests.workers import qcluster, wait_for_runs

    tenants = [registered_tenant("postgresql") for _ in range(3)]
    env = process_env(REDIS_URL=throwaway_redis.url, RUN_QUEUED_TIMEOUT_SECONDS=2)
    queued = manage("migrate_tenants", "--all", env=env)
    assert queued.returncode == 0, queued.stderr
    assert MigrationRun.objects.filter(status="queued").exclude(task_id="").count() == 3
    # Redis restarts without persistence before any worker took them: the messages are gone.
    throwaway_redis.stop()
    throwaway_redis.start()
    time.sleep(3)
    recovered = manage("migrate_tenants", "--recover", env=env)
    assert recovered.returncode == 0, recovered.stderr
    assert recovered.stderr.count("abandoned in the queue (attempt 2 queued as run #") == 3
    assert "the broker lost the message" in recovered.stderr
    for run in MigrationRun.objects.filter(attempt=1):
        assert (run.status, run.error_code) == ("failed", "abandoned")
        assert "nothing ran" in run.error and "SECRET_KEY and Q_SITE_NAME" in run.error
    # The cluster runs with the default bound: its own recovery must not abandon the retries
    # again while its workers are still starting on a loaded machine.
    cluster_env = {**env, "RUN_QUEUED_TIMEOUT_SECONDS": "300"}
    with qcluster(cluster_env, tmp_path / "qcluster.log"):
        retries = wait_for_runs(MigrationRun.objects.filter(attempt=2), timeout=120)
    assert [r.status for r in retries] == ["succeeded"] * 3, [r.error for r in retries]
    for tenant in tenants:
        target = MigrationTarget.objects.get(pk=tenant.target_id)
        assert (target.revision, target.status) == (HEAD, "up_to_date")


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_runs_of_a_killed_sync_command_do_not_block_their_targets(
    registered_tenant, settings, tmp_path
):
    from tests.workers import qcluster, wait_for_runs

    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "slow")
    first, second = registered_tenant("postgresql"), registered_tenant("postgresql")
    signal_file = tmp_path / "inside"
    names = sorted([first.target.name, second.target.name])
    process = _migrate_in_a_process(names, signal_file, MIGRATOR_TEST_SLEEP="60")
    os.killpg(process.pid, signal.SIGKILL)  # killed after the first of two targets started
    process.wait()
    waiting = MigrationRun.objects.get(target__name=names[1])
    assert waiting.status == "queued" and not waiting.task_id

    settings.RUN_STALE_AFTER_SECONDS = 1
    settings.RUN_QUEUED_TIMEOUT_SECONDS = 1
    time.sleep(2)
    printed = recover()
    assert f"for {names[0]} interrupted" in printed
    assert f"Run #{waiting.pk} for {names[1]} abandoned in the queue (attempt 2" in printed
    waiting.refresh_from_db()
    assert waiting.error_code == "abandoned"
    assert (
        "`migrate_tenants --sync`" in waiting.error and "stopped before it ran it" in waiting.error
    )
    # The target is free, and the next attempt is handed to the workers.
    with qcluster(process_env(TENANT_MIGRATIONS_DIR=str(FIXTURES / "slow")), tmp_path / "q.log"):
        [retry] = wait_for_runs(MigrationRun.objects.filter(attempt=2), timeout=90)
    assert retry.status == "succeeded", retry.error
    assert retry.target.name == names[1] and retry.revision_after == "s003_last"


# --- item 1: a graceful stop of a qcluster loses nothing ---------------------------------------


def _start_cluster(env, log_path):
    import subprocess
    import sys

    from tests.workers import ROOT

    return subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"],
        cwd=ROOT,
        env=env,
        stdout=open(log_path, "ab"),  # noqa: SIM115 - closed with the process
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("broker", "signum"),
    [("orm", signal.SIGTERM), ("redis", signal.SIGTERM), ("orm", signal.SIGINT)],
    ids=["orm-SIGTERM", "redis-SIGTERM", "orm-SIGINT"],
)
def test_signal_to_the_cluster_group_finishes_or_hands_back_and_exits(
    broker, signum, registered_tenant, settings, request, tmp_path
):
    from tests.workers import wait_for_runs

    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "slow")
    tenants = [registered_tenant("postgresql") for _ in range(6)]
    extra = {"TENANT_MIGRATIONS_DIR": str(FIXTURES / "slow"), "MIGRATOR_TEST_SLEEP": "3"}
    if broker == "redis":
        extra["REDIS_URL"] = request.getfixturevalue("throwaway_redis").url
    env = process_env(**extra)
    log = tmp_path / "qcluster.log"
    cluster = _start_cluster(env, log)
    try:
        queued = manage("migrate_tenants", "--all", env=env)
        assert queued.returncode == 0, queued.stderr
        runs = MigrationRun.objects.filter(target__in=[t.target for t in tenants])
        _wait_until(lambda: runs.filter(status="running").count() == 2, 60, "no two runs started")
        os.killpg(cluster.pid, signum)  # what systemd (SIGTERM) and Ctrl-C (SIGINT) send
        cluster.wait(timeout=90)  # no deadlock: it exits by itself
    finally:
        if cluster.poll() is None:
            os.killpg(cluster.pid, signal.SIGKILL)
            cluster.wait()
    assert cluster.returncode == 0, log.read_text()
    # The running migrations finished; nothing is half done, nothing is lost.
    assert not runs.filter(status__in=["running", "interrupted", "failed"]).exists(), list(
        runs.values_list("status", "error")
    )
    assert runs.filter(status="succeeded").count() >= 2
    assert "task(s) back to the queue on stopping" in log.read_text()
    # What was not started is still queued, and the next cluster takes it at once.
    second = _start_cluster(env, log)
    try:
        done = wait_for_runs(runs, timeout=120)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
    assert [r.status for r in done] == ["succeeded"] * 6, log.read_text()[-3000:]
    assert runs.count() == 6  # one run each: nothing ran twice, nothing was retried


# --- Low: a worker that ends without an outcome says how --------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("end", "status", "says"),
    [
        (
            "timeout",
            "failed",
            "Stopped by the task timeout: the run took longer than MIGRATION_TASK_TIMEOUT (2 s)",
        ),
        ("sys.exit", "failed", "A revision (or a library it calls) called sys.exit(3)"),
        ("KeyboardInterrupt", "failed", "Interrupted (KeyboardInterrupt)"),
        ("os._exit", "interrupted", "exited with status 3 without recording an outcome"),
        ("segfault", "interrupted", "was killed by SIGSEGV"),
    ],
)
def test_a_worker_that_ends_without_an_outcome_says_how(
    end, status, says, registered_tenant, settings, tmp_path
):
    from tests.workers import qcluster, wait_for_runs

    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "slow")
    tenant = registered_tenant("postgresql")
    extra = {
        "TENANT_MIGRATIONS_DIR": str(FIXTURES / "slow"),
        # Missed heartbeats alone would take 5 minutes to notice: what is seen comes sooner.
        "RUN_HEARTBEAT_SECONDS": "2",
        "RUN_STALE_AFTER_SECONDS": "300",
    }
    if end == "timeout":
        extra.update(MIGRATION_TASK_TIMEOUT="2", MIGRATOR_TEST_SLEEP="60")
    else:
        extra["MIGRATOR_TEST_END"] = end
    env = process_env(**extra)
    log = tmp_path / "qcluster.log"
    with qcluster(env, log):
        assert manage("migrate_tenants", "--target", tenant.target.name, env=env).returncode == 0
        [run] = wait_for_runs(MigrationRun.objects.filter(target=tenant.target), timeout=90)
    assert run.status == status, (run.error, log.read_text()[-3000:])
    assert says in run.error
    assert "worker stopped sending heartbeats" not in run.error
    assert "stands at s001_first" in run.error
    assert "rolled back" in run.error
    target = MigrationTarget.objects.get(pk=tenant.target_id)
    assert (target.status, target.revision) == ("failed", "s001_first")


# --- Low: recovery does not wait behind long migrations ---------------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_recovery_does_not_wait_behind_a_long_migration(registered_tenant, settings, tmp_path):
    from datetime import timedelta

    from django.utils import timezone

    from tenants import actions
    from tenants.models import Trigger
    from tests.workers import qcluster

    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "slow")
    busy, orphan = registered_tenant("postgresql"), registered_tenant("postgresql")
    # A run whose worker died long ago, before this cluster started.
    [dead] = actions.do_enqueue_runs([orphan.target], trigger=Trigger.ADMIN, enqueue=False)
    actions.do_start_run(dead.run.pk, worker_host="gone-host:1")
    MigrationRun.objects.filter(pk=dead.run.pk).update(
        heartbeat_at=timezone.now() - timedelta(hours=1)
    )
    env = process_env(
        workers=1,
        TENANT_MIGRATIONS_DIR=str(FIXTURES / "slow"),
        MIGRATOR_TEST_SLEEP="60",
        MIGRATOR_TEST_SIGNAL=str(tmp_path / "inside"),
        RUN_HEARTBEAT_SECONDS="2",
    )
    with qcluster(env, tmp_path / "qcluster.log"):
        assert manage("migrate_tenants", "--target", busy.target.name, env=env).returncode == 0
        _wait_until((tmp_path / "inside").exists, 60, "the long migration never started")
        # The only worker is busy for a minute; the dead run is recovered meanwhile.
        _wait_until(
            lambda: MigrationRun.objects.get(pk=dead.run.pk).status == "interrupted",
            30,
            "the dead run was not recovered while the long migration ran",
        )
        assert MigrationRun.objects.get(target=busy.target).status == "running"


# --- item 3: a start that did not bring the shared databases to head fails ---------------------


def test_startup_fails_until_the_shared_database_is_at_head_even_with_a_run_queued(
    vault, vault_secret, pg_database, target_factory, settings
):
    from tests.dispatch_fixtures import HEAD

    target_factory(name="shared", kind="shared", provider="postgresql")
    vault_secret("shared", pg_database().secret())
    settings.MIGRATE_SHARED_ON_STARTUP = True
    vault_addr = settings.VAULT_ADDR
    settings.VAULT_ADDR = "http://127.0.0.1:9"  # Vault unreachable

    def start():
        out, err = io.StringIO(), io.StringIO()
        try:
            call_command("startup_migrations", stdout=out, stderr=err)
        except SystemExit as exc:
            return exc.code, out.getvalue() + err.getvalue()
        return 0, out.getvalue() + err.getvalue()

    code, said = start()
    assert code == 1, said
    retry = MigrationRun.objects.get(target__name="shared", status="queued")  # queued retry
    # Start 2: the retry is queued. It used to print "already queued" and exit 0 with the
    # shared database empty; now it runs that run here, and judges by the database.
    code, said = start()
    assert code == 1, said
    assert f"Running run #{retry.pk} for shared here." in said
    assert "Startup stopped" in said
    retry.refresh_from_db()
    assert retry.status == "failed" and retry.error_code == "vault_unavailable"

    settings.VAULT_ADDR = vault_addr  # Vault is back
    code, said = start()
    assert code == 0, said
    assert f"Shared database shared is at {HEAD}." in said
    assert MigrationTarget.objects.get(name="shared").revision == HEAD


# --- item 1: the dashboard and --wait say when nothing takes the queued runs ------------------


def test_dashboard_warns_about_runs_queued_for_more_than_a_minute(
    admin_client, tenant_factory, django_assert_max_num_queries
):
    from datetime import timedelta

    from django.urls import reverse
    from django.utils import timezone

    from tenants import actions
    from tenants.models import Trigger

    old, fresh = tenant_factory(auto_migrate=False), tenant_factory(auto_migrate=False)
    [waiting, _] = actions.do_enqueue_runs(
        [old.target, fresh.target], trigger=Trigger.ADMIN, enqueue=False
    )
    # 12, 1 for the rollouts (none here), 1 the first time a process reads these heads.
    with django_assert_max_num_queries(14):
        quiet = admin_client.get(reverse("fleet-dashboard")).content.decode()
    assert 'id="fleet-waiting"' not in quiet
    MigrationRun.objects.filter(pk=waiting.run.pk).update(
        created_at=timezone.now() - timedelta(minutes=3)
    )
    with django_assert_max_num_queries(14):
        page = admin_client.get(reverse("fleet-dashboard")).content.decode()
    assert "1 run queued for more than a minute without a worker taking it" in page
    assert "is a <code>qcluster</code> running for their queue" in page
    assert "?status__exact=queued" in page


def test_wait_warns_when_nothing_has_started(tenant_factory, monkeypatch):
    from tenants.management.commands import migrate_tenants

    monkeypatch.setattr(migrate_tenants, "QUEUED_WARNING_SECONDS", 1)
    tenant = tenant_factory(auto_migrate=False)
    err = io.StringIO()
    with pytest.raises(SystemExit):  # gave up waiting: the run did not succeed
        call_command(
            "migrate_tenants",
            "--target",
            tenant.target.name,
            "--wait",
            "--timeout",
            "3",
            stderr=err,
        )
    said = err.getvalue()
    assert "Nothing has started after 1s: no worker has taken these runs." in said
    assert "Is a `manage.py qcluster` running for their queue" in said
    assert "Gave up waiting after 3s" in said


# --- item 1: a cluster killed outright, and tasks no worker can read --------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("broker", ["orm", "redis"])
def test_cluster_killed_outright_loses_no_run_and_runs_none_twice(
    broker, registered_tenant, settings, request, tmp_path
):
    from django_q.models import OrmQ

    from tests.workers import wait_for_runs

    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "slow")
    tenants = [registered_tenant("postgresql") for _ in range(6)]
    extra = {"TENANT_MIGRATIONS_DIR": str(FIXTURES / "slow")}
    if broker == "redis":
        extra["REDIS_URL"] = request.getfixturevalue("throwaway_redis").url
    log = tmp_path / "qcluster.log"
    first = _start_cluster(process_env(**extra, MIGRATOR_TEST_SLEEP="60"), log)
    try:
        queued = manage("migrate_tenants", "--all", env=process_env(**extra))
        assert queued.returncode == 0, queued.stderr
        runs = MigrationRun.objects.filter(target__in=[t.target for t in tenants])
        _wait_until(lambda: runs.filter(status="running").count() == 2, 60, "no run started")
        time.sleep(1)  # the pusher takes more than the workers run
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # no cleanup of any kind
        first.wait()
    assert runs.filter(status="queued").count() == 4
    # The next cluster's own recovery closes the two killed runs as interrupted, and the four
    # the dead cluster had taken (ORM: locked for an hour; Redis: popped) as abandoned, and
    # queues their next attempt; it runs those. Within a minute, not an hour.
    env = process_env(
        **extra,
        RUN_HEARTBEAT_SECONDS="2",
        RUN_STALE_AFTER_SECONDS="6",
        RUN_QUEUED_TIMEOUT_SECONDS="5",
    )
    second = _start_cluster(env, log)
    try:
        _wait_until(
            lambda: runs.filter(attempt=2, status="succeeded").count() == 4,
            120,
            "the taken runs were not sent again",
        )
        if broker == "orm":
            # An hour later the dead cluster's messages come out again: they do nothing.
            OrmQ.objects.update(lock=timezone_now())
            _wait_until(lambda: not OrmQ.objects.exists(), 60, "the old messages stayed")
        wait_for_runs(runs, timeout=60)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
    assert runs.filter(status="interrupted").count() == 2
    assert runs.filter(attempt=1, status="failed", error_code="abandoned").count() == 4
    assert runs.filter(attempt=2, status="succeeded").count() == 4
    assert runs.filter(status="succeeded").count() == 4  # nothing ran twice


def timezone_now():
    from django.utils import timezone

    return timezone.now()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_tasks_a_worker_cannot_read_are_abandoned_naming_the_secret_key(
    registered_tenant, tmp_path
):
    from tests.workers import qcluster, wait_for_runs

    tenant = registered_tenant("postgresql")
    env = process_env(RUN_HEARTBEAT_SECONDS="1", RUN_STALE_AFTER_SECONDS="5")
    env["RUN_QUEUED_TIMEOUT_SECONDS"] = "3"
    # A worker started with another SECRET_KEY drops each task (django-q2: BadSignature).
    with qcluster({**env, "SECRET_KEY": "another-key-" + "x" * 40}, tmp_path / "q.log"):
        assert manage("migrate_tenants", "--target", tenant.target.name, env=env).returncode == 0
        _wait_until(
            lambda: (
                MigrationRun.objects.filter(target=tenant.target, attempt=2)
                .exclude(status="queued")
                .exists()
            ),
            90,
            "the runs were not abandoned",
        )
    runs = wait_for_runs(MigrationRun.objects.filter(target=tenant.target), timeout=10)
    runs.sort(key=lambda r: r.attempt)
    assert [(r.attempt, r.status, r.error_code) for r in runs] == [
        (1, "failed", "abandoned"),
        # Sent again by that cluster's own recovery, signed with its key: its workers read it.
        (2, "succeeded", ""),
    ]
    assert "SECRET_KEY and Q_SITE_NAME" in runs[0].error and "BadSignature" in runs[0].error
    assert "BadSignature" in (tmp_path / "q.log").read_text()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_revision_holding_the_gil_is_not_declared_dead(registered_tenant, settings, tmp_path):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "slow")
    tenant = registered_tenant("postgresql")
    # Beats every second, but the revision holds the GIL for 12 s: the heartbeat thread starves.
    process = _migrate_in_a_process(
        [tenant.target.name],
        tmp_path / "inside",
        MIGRATOR_TEST_HOLD_GIL="12",
        RUN_HEARTBEAT_SECONDS="1",
        RUN_STALE_AFTER_SECONDS="3",
    )
    run = MigrationRun.objects.get(target=tenant.target)
    settings.RUN_STALE_AFTER_SECONDS = 3
    try:
        _wait_until(
            lambda: "left running" in recover(), 30, "the starved run was never found silent"
        )
        run.refresh_from_db()
        assert run.status == "running"
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    run.refresh_from_db()
    assert run.status == "succeeded" and run.applied == ["s001_first", "s002_sleepy", "s003_last"]
    assert not MigrationRun.objects.filter(target=tenant.target).exclude(pk=run.pk).exists()
