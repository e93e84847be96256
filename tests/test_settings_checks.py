"""Misconfiguration is reported at start, naming the setting."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_manage(*args, **env_overrides):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "SECRET_KEY"))}
    env.pop("DEBUG", None)
    env["DJANGO_SETTINGS_MODULE"] = "controlplane.settings"
    env["DATA_DIR"] = env.get("DATA_DIR", str(ROOT / "var"))
    env.update(env_overrides)
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_missing_secret_key_is_named_by_the_check():
    result = run_manage("check", VAULT_TOKEN="x")
    assert result.returncode != 0
    assert "controlplane.E001" in result.stderr
    assert "SECRET_KEY is not set" in result.stderr


def test_debug_gives_a_development_secret_key():
    result = run_manage("check", DEBUG="true", VAULT_TOKEN="x")
    assert result.returncode == 0, result.stderr
    assert "E001" not in result.stderr


def test_bad_vault_auth_method_is_named():
    result = run_manage("check", SECRET_KEY="k" * 50, VAULT_AUTH_METHOD="ldap")
    assert result.returncode != 0
    assert "controlplane.E002" in result.stderr
    assert "VAULT_AUTH_METHOD is 'ldap'" in result.stderr
    assert "token, approle, kubernetes" in result.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"VAULT_AUTH_METHOD": "approle"}, "VAULT_ROLE_ID is not set"),
        ({"VAULT_AUTH_METHOD": "kubernetes"}, "VAULT_KUBERNETES_ROLE is not set"),
        ({"VAULT_ADDR": "vault.example.com:8200", "VAULT_TOKEN": "x"}, "VAULT_ADDR is"),
        ({"VAULT_CACHE_SECONDS": "-1", "VAULT_TOKEN": "x"}, "VAULT_CACHE_SECONDS must be 0"),
        ({"TENANT_MIGRATIONS_DIR": "/nonexistent", "VAULT_TOKEN": "x"}, "TENANT_MIGRATIONS_DIR"),
    ],
)
def test_other_misconfigurations_are_named(env, expected):
    result = run_manage("check", SECRET_KEY="k" * 50, **env)
    assert result.returncode != 0
    assert expected in result.stderr


def test_missing_vault_token_is_a_warning_not_an_error():
    result = run_manage("check", SECRET_KEY="k" * 50)
    assert result.returncode == 0, result.stderr
    assert "controlplane.W001" in result.stderr


def test_wsgi_application_refuses_to_start_without_secret_key():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "SECRET_KEY"))}
    env.pop("DEBUG", None)
    env["DJANGO_SETTINGS_MODULE"] = "controlplane.settings"
    result = subprocess.run(
        [sys.executable, "-c", "import controlplane.wsgi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr


# --- values of the wrong type, PostgreSQL durations, workers (issue 17, issue 20) -------------


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"Q_WORKERS": "two"}, "Q_WORKERS is 'two'; it must be a whole number."),
        ({"VAULT_TIMEOUT": "10s"}, "VAULT_TIMEOUT is '10s'; it must be a whole number."),
        ({"Q_POLL": "fast"}, "Q_POLL is 'fast'; it must be a number."),
        ({"VERIFY_AFTER_UPGRADE": "ture"}, "VERIFY_AFTER_UPGRADE is 'ture'; it must be true or"),
        ({"REGION_CLUSTERS": "eu"}, "REGION_CLUSTERS is 'eu'; it must be NAME=VALUE pairs"),
    ],
)
def test_a_value_of_the_wrong_type_is_named_without_a_traceback(env, expected):
    result = run_manage("check", SECRET_KEY="k" * 50, VAULT_TOKEN="x", **env)
    assert result.returncode != 0
    assert "controlplane.E040" in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"MIGRATION_PG_LOCK_TIMEOUT": "five seconds"},
            "MIGRATION_PG_LOCK_TIMEOUT is 'five seconds', which PostgreSQL does not read",
        ),
        ({"MIGRATION_PG_STATEMENT_TIMEOUT": "15 mins"}, "MIGRATION_PG_STATEMENT_TIMEOUT is"),
        ({"Q_WORKERS": "0"}, "Q_WORKERS is 0; a qcluster needs 1 worker or more."),
        ({"API_THROTTLE_ANON": "20 per minute"}, "API_THROTTLE_ANON is '20 per minute'"),
        ({"API_TOKEN_TTL_DAYS": "-1"}, "API_TOKEN_TTL_DAYS must be 0"),
        ({"MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT": "0"}, "MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT is 0;"),
        ({"MIGRATION_MYSQL_STATEMENT_TIMEOUT": "-1"}, "MIGRATION_MYSQL_STATEMENT_TIMEOUT must be"),
    ],
)
def test_values_out_of_their_range_are_named(env, expected):
    result = run_manage("check", SECRET_KEY="k" * 50, VAULT_TOKEN="x", **env)
    assert result.returncode != 0
    assert expected in result.stderr


def test_wsgi_application_refuses_to_start_with_a_value_of_the_wrong_type():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "SECRET_KEY"))}
    env.update(
        DJANGO_SETTINGS_MODULE="controlplane.settings",
        SECRET_KEY="k" * 50,
        VAULT_TOKEN="x",
        MIGRATION_PG_LOCK_TIMEOUT="five seconds",
        Q_WORKERS="many",
    )
    result = subprocess.run(
        [sys.executable, "-c", "import controlplane.wsgi"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Q_WORKERS is 'many'" in result.stderr
    assert "MIGRATION_PG_LOCK_TIMEOUT is 'five seconds'" in result.stderr


DURATIONS = [
    "5s",
    "5 s",
    " 5s ",
    "500",
    "500ms",
    "1.5s",
    "15min",
    "2h",
    "1d",
    "0",
    "1e3",
    "250us",
    "0x10",
    "010",
    "+5s",
    "24d",
    "five seconds",
    "5 seconds",
    "5S",
    "5sec",
    "15mins",
    "-1",
    "",
    "s",
    "1.5.2s",
    "08",
    "25d",
    "5s5",
    "inf",
]


@pytest.mark.postgres
def test_the_duration_check_reads_values_as_postgresql_does(postgres_server):
    """Every value in DURATIONS is accepted by the check exactly when PostgreSQL accepts it
    for lock_timeout and statement_timeout."""
    import psycopg

    from controlplane.checks import postgres_duration_ms

    disagreements = []
    with postgres_server.connect() as conn:
        for value in DURATIONS:
            try:
                conn.execute("SELECT set_config('lock_timeout', %s, false)", (value,))
                postgres = conn.execute(
                    "SELECT setting::bigint FROM pg_settings WHERE name = 'lock_timeout'"
                ).fetchone()[0]
            except psycopg.Error:
                postgres = None
            if postgres_duration_ms(value) != postgres:
                disagreements.append((value, postgres_duration_ms(value), postgres))
    assert disagreements == []
