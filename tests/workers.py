"""Real django-q2 worker clusters and management commands in separate processes.

They share the test's control-plane database (the pytest-django test database file, committed
by ``transactional_db`` tests) and the session's OpenBao.
"""

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.db import connection

ROOT = Path(__file__).resolve().parent.parent


def process_env(vault=None, **overrides):
    """Environment for a child process that sees this test's database and Vault."""
    env = dict(os.environ)
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    db = connection.settings_dict
    if db["ENGINE"] == "django.db.backends.sqlite3":
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    else:
        raise NotImplementedError("worker tests run on the SQLite control-plane database")
    env["VAULT_ADDR"] = settings.VAULT_ADDR
    env["VAULT_TOKEN"] = settings.VAULT_TOKEN
    env["VAULT_AUTH_METHOD"] = "token"
    env["TENANT_MIGRATIONS_DIR"] = str(settings.TENANT_MIGRATIONS_DIR)
    env["Q_WORKERS"] = str(overrides.pop("workers", 2))
    env.pop("REDIS_URL", None)
    env.update({k: str(v) for k, v in overrides.items()})
    return env


def manage(*args, env, timeout=120, check=False):
    result = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"manage.py {' '.join(args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
        )
    return result


@contextmanager
def qcluster(env, log_path=None):
    """A real ``manage.py qcluster`` for the duration of the block."""
    log = open(log_path or os.devnull, "wb")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            # The cluster's main process stops its own workers; signalling the whole group at
            # once makes django-q2's sentinel wait for children that are already gone.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def wait_for_runs(queryset, *, timeout=60):
    """Poll until every run in ``queryset`` is finished; return them."""
    from tenants.models import ACTIVE_RUN_STATUSES

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if queryset.exists() and not queryset.filter(status__in=ACTIVE_RUN_STATUSES).exists():
            return list(queryset)
        time.sleep(0.2)
    states = list(queryset.values_list("target__name", "status"))
    raise AssertionError(f"runs still active after {timeout}s: {states}")
