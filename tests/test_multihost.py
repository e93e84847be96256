"""Many hosts (issue 23): ``qcluster`` on several worker hosts against one Redis and one
PostgreSQL control plane; one host killed in the middle of a fleet's migration, and one that
vanishes from the network with a migration under way.

Each host is a network namespace of its own with its own host name (tests/netns.py); the control
plane's PostgreSQL, Redis, OpenBao and the tenant databases are reachable from it only over its
veth link. The operator's commands run in the root namespace, as from another machine. Needs
root and ``ip netns``: skipped without them on a developer machine, a failure under ``CI=true``.
"""

import csv
import json
import os
import secrets
import subprocess
import sys
import time
from urllib.parse import quote

import pytest

from tests import netns, services
from tests.test_reliability import FIXTURES

pytestmark = [
    pytest.mark.netns,
    pytest.mark.postgres,
    pytest.mark.vault,
    pytest.mark.redis,
    pytest.mark.slow,
]

HOSTS = ("mh-a", "mh-b", "mh-c")
TARGETS = 30
CHAIN = ["s001_first", "s002_sleepy", "s003_last"]


@pytest.fixture
def service_address(openbao, redis_url, tmp_path):
    """The services' address seen from the worker hosts (tests/netns.py), removed afterwards."""
    reason = netns.missing_capability()
    if reason:
        services.unavailable("netns", reason)
    redis_port = int(redis_url.split(":")[2].split("/")[0])
    postgres_port = services.PostgresServer(services.TEST_POSTGRES_URL).port
    service = netns.ServiceAddress(
        [postgres_port, redis_port, openbao.port], log_path=tmp_path / "forwarder.log"
    ).start()
    yield service
    service.stop()


@pytest.fixture
def worker_hosts(service_address):
    """Factory: a worker host named ``name``; each is stopped and removed afterwards, also when
    the test fails."""
    made = []

    def make(name):
        host = netns.WorkerHost(service_address, len(made) + 1, name)
        made.append(host)
        return host.create()

    yield make
    for host in made:  # all at once: each qcluster takes seconds to stop
        host.terminate()
    for host in made:
        host.stop()


class ControlPlane:
    """The control plane's PostgreSQL database, read directly (the test's own eyes)."""

    def __init__(self, db):
        self.db = db

    def rows(self, sql, params=()):
        import psycopg

        with psycopg.connect(
            host=self.db.host,
            port=self.db.port,
            user=self.db.admin_username,
            password=self.db.admin_password,
            dbname=self.db.database,
            connect_timeout=5,
        ) as conn:
            return conn.execute(sql, params).fetchall()

    def runs(self):
        """Every run: (id, target, status, error_code, worker_host, applied, error)."""
        return self.rows(
            "SELECT r.id, t.name, r.status, r.error_code, r.worker_host, r.applied, r.error "
            "FROM tenants_migrationrun r JOIN tenants_migrationtarget t ON t.id = r.target_id "
            "ORDER BY r.id"
        )


def _manage(args, env, *, timeout=180):
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=netns.ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s: {what}")


def _plane_settings(service_address, control_db, openbao, redis_url, tmp_path, **overrides):
    """The settings of every process of the control plane (web, workers, commands): each
    service at its address over the links. The control-plane database is migrated."""
    address = service_address.address
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VAULT_", "Q_", "REDIS_", "RUN_", "DATABASE_", "MIGRATOR_"))
        },
        "DJANGO_SETTINGS_MODULE": "controlplane.settings",
        "SECRET_KEY": secrets.token_urlsafe(40),
        "DEBUG": "false",
        "DATA_DIR": str(tmp_path / "data"),
        "DATABASE_URL": f"postgres://{control_db.admin_username}:"
        f"{quote(control_db.admin_password, safe='')}@{address}:{control_db.port}/"
        f"{control_db.database}",
        "REDIS_URL": service_address.url(redis_url),
        "VAULT_ADDR": service_address.url(openbao.addr),
        "VAULT_TOKEN": openbao.root_token,
        "VAULT_AUTH_METHOD": "token",
        "TENANT_MIGRATIONS_DIR": str(FIXTURES / "slow"),
        "VERIFY_AFTER_UPGRADE": "false",
        "Q_WORKERS": "2",
        "Q_CLUSTER_NAME": f"multihost-{secrets.token_hex(3)}",  # a queue of its own on Redis
        # A dead host's runs are noticed within seconds, not minutes.
        "RUN_HEARTBEAT_SECONDS": "1",
        "RUN_STALE_AFTER_SECONDS": "5",
        "RUN_QUEUED_TIMEOUT_SECONDS": "5",
        **overrides,
    }
    migrated = _manage(["migrate", "-v0"], env)
    assert migrated.returncode == 0, migrated.stderr
    return env


def _import_tenants(names, env, tmp_path):
    """Register a dedicated PostgreSQL tenant per name (its secret at that name) with
    ``import_tenants``, as an operator would."""
    events = tmp_path / "tenants.csv"
    with events.open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(
            ["tenant_id", "name", "database_strategy", "database_provider", "vault_path"]
        )
        for name in names:
            writer.writerow([name, name, "dedicated", "postgresql", name])
    imported = _manage(["import_tenants", str(events)], env)
    assert imported.returncode == 0, imported.stdout + imported.stderr


def _start_qcluster(host, env, log):
    """Start ``manage.py qcluster`` on ``host``; returns a function that waits until its
    workers and its pusher are up."""
    host.popen([sys.executable, "manage.py", "qcluster"], env=env, log_path=log)
    workers = int(env["Q_WORKERS"])

    def ready():
        text = log.read_text(errors="replace")
        return text.count("ready for work at") >= workers and "pushing tasks at" in text

    return lambda: _wait_until(ready, 90, f"the qcluster of {host.name} did not start")


def test_a_fleet_migrates_across_hosts_and_survives_losing_one(
    service_address, worker_hosts, pg_database, vault_secret, openbao, redis_url, tmp_path
):
    address = service_address.address
    control_db = pg_database()
    plane = ControlPlane(control_db)
    env = _plane_settings(
        service_address,
        control_db,
        openbao,
        redis_url,
        tmp_path,
        MIGRATOR_TEST_SLEEP="1",  # each migration holds its target a while: runs in flight
    )
    databases = {}
    for index in range(TARGETS):
        db = pg_database()
        name = f"mh{index:02d}"
        vault_secret(name, db.secret(host=address))
        databases[name] = db
    _import_tenants(databases, env, tmp_path)

    hosts = {name: worker_hosts(name) for name in HOSTS}
    logs = {name: tmp_path / f"{name}.log" for name in HOSTS}
    for wait in [_start_qcluster(host, env, logs[name]) for name, host in hosts.items()]:
        wait()
    victim = hosts["mh-c"]

    # The operator, on another machine: migrate everything and wait.
    first = subprocess.Popen(
        [sys.executable, "manage.py", "migrate_tenants", "--all", "--wait", "--json"],
        cwd=netns.ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def victim_busy_mid_fleet():
            statuses = [(status, host) for _, _, status, _, host, _, _ in plane.runs()]
            finished = sum(status == "succeeded" for status, _ in statuses)
            return finished >= 6 and any(
                status == "running" and host.startswith("mh-c:") for status, host in statuses
            )

        _wait_until(victim_busy_mid_fleet, 120, "mh-c never ran a migration mid-fleet")
        # The host dies (every process at once) and drops off the network.
        victim.kill()
        victim.cut()
        out, err = first.communicate(timeout=150)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()

    # The killed host's running migrations were closed by the surviving hosts' recovery:
    # interrupted (the first command then exits 1), or, for one killed after its last commit,
    # recorded as completed from what its database shows.
    interrupted = [row for row in plane.runs() if row[2] == "interrupted"]
    completed_by_recovery = plane.rows(
        "SELECT r.id, t.name FROM tenants_migrationrun r "
        "JOIN tenants_migrationtarget t ON t.id = r.target_id "
        "WHERE r.status = 'succeeded' AND r.log LIKE %s",
        ("%so the run is recorded as completed%",),
    )
    assert interrupted or completed_by_recovery, plane.runs()
    assert first.returncode == (1 if interrupted else 0), out[-3000:] + err[-3000:]
    for _, target, _, _, host, _, error in interrupted:
        assert host.startswith("mh-c:"), (target, host)
        assert "stopped sending heartbeats" in error, error
    survivors_log = logs["mh-a"].read_text() + logs["mh-b"].read_text()
    for run_id, target, *_ in interrupted + completed_by_recovery:
        assert f"Run #{run_id} for {target}" in survivors_log, survivors_log[-3000:]

    # The README's next step: re-run what failed or was interrupted, on the hosts still up.
    again = _manage(["migrate_tenants", "--recover", "--failed", "--wait", "--json"], env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {row["target"] for row in json.loads(again.stdout)} >= {r[1] for r in interrupted}

    runs = plane.runs()
    by_target = {}
    for row in runs:
        by_target.setdefault(row[1], []).append(row)
    assert set(by_target) == set(databases)
    for target, target_runs in by_target.items():
        statuses = [status for _, _, status, *_ in target_runs]
        # Migrated exactly once: one successful run, and every revision applied once in all.
        assert statuses.count("succeeded") == 1, (target, statuses)
        assert sum((applied for *_, applied, _ in target_runs), []) == CHAIN, target_runs
        # Nothing else failed: a run is interrupted (its host died) or was abandoned in the
        # queue (the dead host's pusher had taken its message), and its next attempt succeeded.
        for _, _, status, code, *_ in target_runs:
            assert status == "succeeded" or code in ("interrupted", "abandoned"), target_runs
    # Every host took part; the fleet ended on the hosts that stayed.
    names = {host.split(":")[0] for *_, host, _, _ in runs if host}
    assert names == set(HOSTS), names
    finishers = {row[4].split(":")[0] for row in runs if row[2] == "succeeded"}
    assert len(finishers) > 1, finishers
    for run in interrupted:
        [retry] = [r for r in by_target[run[1]] if r[2] == "succeeded"]
        assert retry[0] > run[0] and not retry[4].startswith("mh-c:"), (run, retry)

    # What the databases say, read by the test itself: every one at head.
    assert plane.rows("SELECT DISTINCT status, revision FROM tenants_migrationtarget") == [
        ("up_to_date", CHAIN[-1])
    ]
    for name, db in databases.items():
        import psycopg

        with psycopg.connect(
            host=db.host,
            port=db.port,
            user=db.admin_username,
            password=db.admin_password,
            dbname=db.database,
        ) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [
                (CHAIN[-1],)
            ], name


@pytest.fixture
def linked_postgres(service_address):
    """A PostgreSQL server listening on the services' address itself (tests/netns.py)."""
    server = netns.LinkedPostgres(service_address)
    try:
        server.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        server.stop()
        services.unavailable("netns", f"a PostgreSQL server of its own: {exc}")
    yield server
    server.stop()


def test_a_host_that_vanishes_mid_migration_frees_its_target(
    service_address,
    linked_postgres,
    worker_hosts,
    pg_database,
    vault_secret,
    openbao,
    redis_url,
    tmp_path,
):
    """A host whose link goes down with a migration under way (power lost, a partition):
    nothing it held is closed, and the tenant database's server (reached with no forwarder
    between) sees a silent client holding the target's migration lock. The server's keepalives
    on the migration session end it, recovery on the host still up closes the run as
    interrupted, and the target is migrated again. (Before, the server kept the session for
    as long as the operating system's keepalive allows, over two hours, and recovery left the
    run running: "the target's migration lock is still held".)"""
    import psycopg
    from psycopg import sql

    control_db = pg_database()
    plane = ControlPlane(control_db)
    env = _plane_settings(
        service_address,
        control_db,
        openbao,
        redis_url,
        tmp_path,
        Q_WORKERS="1",
        RUN_STALE_AFTER_SECONDS="8",
    )
    admin, password, database = "gone_admin", secrets.token_urlsafe(12), "gone_db"
    with psycopg.connect(linked_postgres.url("postgres"), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(admin), sql.Literal(password)
            )
        )
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(database), sql.Identifier(admin)
            )
        )
    vault_secret(
        "gone01",
        {
            "provider": "postgresql",
            "host": linked_postgres.host,
            "port": str(linked_postgres.port),
            "database": database,
            "admin_username": admin,
            "admin_password": password,
            "app_username": admin,
            "app_password": password,
        },
    )
    _import_tenants(["gone01"], env, tmp_path)

    gone = worker_hosts("mh-gone")
    inside = tmp_path / "inside-s002"
    # The revision in progress waits (a long data migration): the run holds the target's lock.
    _start_qcluster(
        gone,
        {**env, "MIGRATOR_TEST_SLEEP": "600", "MIGRATOR_TEST_SIGNAL": str(inside)},
        tmp_path / "mh-gone.log",
    )()
    queued = _manage(["migrate_tenants", "--target", "gone01"], env)
    assert queued.returncode == 0, queued.stdout + queued.stderr
    _wait_until(inside.exists, 60, "the migration never reached its second revision")

    # The link goes first, so nothing the host closes afterwards reaches anyone.
    gone.cut()
    gone.kill()
    up = worker_hosts("mh-up")
    _start_qcluster(up, env, tmp_path / "mh-up.log")()

    def closed():
        return [row for row in plane.runs() if row[2] != "running"]

    _wait_until(closed, 90, "the vanished host's run was never closed")
    [(run_id, _, status, code, host, applied, error)] = plane.runs()
    assert (status, code) == ("interrupted", "interrupted"), error
    assert host.startswith("mh-gone:") and "stopped sending heartbeats" in error, error
    assert applied == CHAIN[:1], applied  # its first revision was committed, the second not
    assert f"Run #{run_id} for gone01 interrupted" in (tmp_path / "mh-up.log").read_text()

    again = _manage(["migrate_tenants", "--failed", "--wait"], env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    runs = plane.runs()
    assert [(r[2], r[4].split(":")[0], r[5]) for r in runs] == [
        ("interrupted", "mh-gone", CHAIN[:1]),
        ("succeeded", "mh-up", CHAIN[1:]),
    ]
    with psycopg.connect(linked_postgres.url(database)) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(CHAIN[-1],)]
