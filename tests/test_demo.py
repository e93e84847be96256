"""`make demo`'s second shell: the demo writes DATA_DIR/demo/env and says so first; a shell that
sources it queues runs the demo's worker carries out; a busy port stops the demo before "ready";
its databases and roles on the local servers are named for its data directory, its app users
are granted what the grant check expects, and `demo --clean` drops them.

Each test runs the demo as a user does, `python manage.py demo`, in a data directory of its own.
"""

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import services

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.mysql]


def demo_env(data_dir):
    """A shell's environment with none of this test's settings: what `make demo` starts from."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("VAULT_", "DJANGO_", "Q_"))
        and k not in ("SECRET_KEY", "DATABASE_URL", "REDIS_URL", "DATA_DIR")
    }
    env.update(
        DEBUG="true",
        DATA_DIR=str(data_dir),
        DEMO_POSTGRES_URL=services.TEST_POSTGRES_URL,
        DEMO_MYSQL_URL=services.TEST_MYSQL_URL,
    )
    return env


def prefix(data_dir):
    return "demo_" + hashlib.sha256(str(Path(data_dir).resolve()).encode()).hexdigest()[:8]


def manage(*args, env, timeout=300):
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pg_roles(name_prefix):
    with services.PostgresServer(services.TEST_POSTGRES_URL).connect() as conn:
        return sorted(
            r[0]
            for r in conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (name_prefix + "%",)
            )
        )


def mysql_users(name_prefix):
    conn = services.MySQLServer(services.TEST_MYSQL_URL).connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT user FROM mysql.user WHERE user LIKE %s", (name_prefix + "%",))
            return sorted(r[0] for r in cur.fetchall())
    finally:
        conn.close()


@pytest.fixture
def data_dir(tmp_path, postgres_server, mysql_server):
    directory = tmp_path / "var"
    directory.mkdir()
    yield directory
    # Whatever a failed test left on the servers.
    manage("demo", "--clean", env=demo_env(directory))


def test_the_second_shell_queues_runs_the_demos_worker_carries_out(data_dir):
    port = services.free_port()
    env = demo_env(data_dir)
    log = open(data_dir / "demo-output.txt", "w+")  # noqa: SIM115 - closed below
    demo = subprocess.Popen(
        [sys.executable, "manage.py", "demo", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # As a shell script's background job (`make demo &`) starts it: SIGINT ignored. The
        # Ctrl-C below must stop it all the same.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # noqa: PLW1509
    )
    try:
        deadline = time.monotonic() + 180
        while "The demo is ready." not in Path(log.name).read_text():
            assert demo.poll() is None, Path(log.name).read_text()
            assert time.monotonic() < deadline, Path(log.name).read_text()
            time.sleep(0.5)
        output = Path(log.name).read_text()
        env_file = data_dir / "demo" / "env"
        assert output.splitlines()[0].startswith(f"In another shell: source {env_file}")
        assert env_file.stat().st_mode & 0o777 == 0o600
        text = env_file.read_text()
        for key in ("SECRET_KEY", "VAULT_ADDR", "VAULT_TOKEN", "DATABASE_URL", "DATA_DIR"):
            assert f"export {key}=" in text

        # The second shell: only what the env file gives it.
        second = {k: v for k, v in demo_env(data_dir).items() if k != "DATA_DIR"}
        targets = "umbrella hooli"
        shell = subprocess.run(
            [
                "bash",
                "-c",
                f"source {env_file} && {sys.executable} manage.py migrate_tenants "
                f"--target {targets} --wait --timeout 150",
            ],
            cwd=ROOT,
            env=second,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert shell.returncode == 0, shell.stdout + shell.stderr
        assert "succeeded" in shell.stdout, shell.stdout

        # Its app users were granted what the application needs: no grant problem to show.
        verify = subprocess.run(
            [
                "bash",
                "-c",
                f"source {env_file} && {sys.executable} manage.py migrate_tenants "
                f"--target {targets} --verify --json",
            ],
            cwd=ROOT,
            env=second,
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert verify.returncode == 0, verify.stdout + verify.stderr
        report = json.loads(verify.stdout)
        assert [(r["target"], r["grant_problems"], r["grants_not_checked"]) for r in report] == [
            ("hooli", [], None),
            ("umbrella", [], None),
        ], report
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(timeout=60)
        log.close()

    name = prefix(data_dir)
    assert pg_roles(name) == [f"{name}_umbrella_admin", f"{name}_umbrella_app"]
    assert mysql_users(name) == [f"{name}_hooli_admin", f"{name}_hooli_app"]
    cleaned = manage("demo", "--clean", env=env)
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"PostgreSQL: dropped database {name}_umbrella" in cleaned.stdout
    assert pg_roles(name) == []
    assert mysql_users(name) == []
    assert not (data_dir / "demo").exists()


def test_a_busy_port_stops_the_demo_before_ready(data_dir):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = manage("demo", "--port", str(port), env=demo_env(data_dir), timeout=120)
    assert result.returncode == 2
    assert "ready" not in result.stdout
    assert f"Port {port} on 127.0.0.1 is already in use" in result.stderr
    assert f"--port {port + 1}" in result.stderr


def test_two_data_directories_get_their_own_server_names(tmp_path, data_dir):
    other = tmp_path / "other"
    other.mkdir()
    try:
        for directory in (data_dir, other):
            result = manage("demo", "--setup-only", env=demo_env(directory))
            assert result.returncode == 0, result.stdout + result.stderr
        assert prefix(data_dir) != prefix(other)
        assert len(pg_roles(prefix(data_dir))) == 2
        assert len(pg_roles(prefix(other))) == 2
    finally:
        manage("demo", "--clean", env=demo_env(other))


def test_the_env_file_gives_a_fresh_shell_the_python_the_readme_commands_name(tmp_path):
    """`source var/demo/env`, then `python manage.py ...` exactly as the README writes it, in a
    shell whose PATH has no virtualenv (a new terminal: `python` is missing or another one)."""
    data_dir = tmp_path / "var"
    setup = manage("demo", "--setup-only", "--no-servers", env=demo_env(data_dir))
    assert setup.returncode == 0, setup.stdout + setup.stderr
    env_file = data_dir / "demo" / "env"
    fresh = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    shell = subprocess.run(
        ["bash", "-c", f"source {env_file} && python manage.py migrate_tenants --cancel --all"],
        cwd=ROOT,
        env=fresh,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shell.returncode == 0, shell.stdout + shell.stderr
    assert "Cancelled 0 queued run(s)." in shell.stdout + shell.stderr


def test_the_env_file_carries_the_teams_own_alembic_directory(tmp_path):
    """A demo started with TENANT_MIGRATIONS_DIR (relative, as typed) on a team's own Alembic
    project: the second shell plans from that directory, wherever it is started, as the worker
    does."""
    data_dir = tmp_path / "var"
    own = "tests/alembic_fixtures/data_migration"
    env = {**demo_env(data_dir), "TENANT_MIGRATIONS_DIR": own}
    setup = manage("demo", "--setup-only", "--no-servers", env=env)
    assert setup.returncode == 0, setup.stdout + setup.stderr
    env_file = data_dir / "demo" / "env"
    assert f"export TENANT_MIGRATIONS_DIR={ROOT / own}\n" in env_file.read_text()
    fresh = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    shell = subprocess.run(
        ["bash", "-c", f"source {env_file} && python {ROOT / 'manage.py'} diffsettings"],
        cwd=tmp_path,
        env=fresh,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shell.returncode == 0, shell.stdout + shell.stderr
    assert f"TENANT_MIGRATIONS_DIR = '{ROOT / own}'" in shell.stdout
