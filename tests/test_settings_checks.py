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
