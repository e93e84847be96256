"""Database credentials from a real OpenBao: reading, caching, errors, and never leaking values."""

import io
import logging
import secrets
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
from django.core.management import CommandError, call_command

from migrator import process
from migrator.exceptions import (
    SecretIncomplete,
    SecretNotFound,
    UnknownProvider,
    VaultAuthError,
    VaultForbidden,
    VaultUnavailable,
)
from migrator.secrets import ConnectionInfo, Secret, get_secrets_manager
from tests import services

pytestmark = pytest.mark.vault

READ_PATH = "/v1/secret/data/database/{}"


def new_path():
    return f"t-{secrets.token_hex(4)}"


def server_secret(**overrides):
    """A complete secret for a database server, in the original design's layout."""
    data = {
        "admin_username": "migrator_admin",
        "admin_password": f"adm-{secrets.token_urlsafe(12)}",
        "app_username": "migrator_app",
        "app_password": f"app-{secrets.token_urlsafe(12)}",
        "host": "db.example.internal",
        "port": "5432",
        "database": "tenant_db",
    }
    data.update(overrides)
    return {key: value for key, value in data.items() if value is not None}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


# --- Secret and ConnectionInfo ----------------------------------------------------------------


def test_secret_prints_as_asterisks_and_reveals_its_value():
    secret = Secret("hunter2-canary")
    assert not isinstance(secret, str)
    assert repr(secret) == str(secret) == f"{secret}" == f"{secret:>30}" == "**********"
    assert secret.reveal() == "hunter2-canary"
    assert secret == Secret("hunter2-canary")
    assert secret != Secret("other-value")
    assert secret != "hunter2-canary"


def test_connection_info_repr_never_shows_the_password():
    info = ConnectionInfo(
        provider="postgresql",
        host="db",
        port=5432,
        database="app",
        username="admin",
        password=Secret("pw-canary-123"),
        vault_path="secret/data/database/x",
        role="admin",
    )
    assert "pw-canary-123" not in repr(info)
    assert "pw-canary-123" not in str(info)
    assert info.password.reveal() == "pw-canary-123"


# --- Reading with a token -------------------------------------------------------------------


@pytest.mark.postgres
def test_token_auth_reads_admin_and_app_users_that_log_in(vault_manager, vault_secret, pg_database):
    import psycopg

    db = pg_database()
    path = vault_secret(new_path(), db.secret(options='{"connect_timeout": "5"}'))
    manager = vault_manager()

    admin = manager.migration_credentials(path, provider="postgresql")
    app = manager.application_credentials(path, provider="postgresql")

    assert (admin.role, admin.username, admin.port) == ("admin", db.admin_username, db.port)
    assert (app.role, app.username) == ("app", db.app_username)
    assert admin.vault_path == f"secret/data/database/{path}"
    assert admin.options == {"connect_timeout": "5"}
    for info in (admin, app):
        with psycopg.connect(
            host=info.host,
            port=info.port,
            dbname=info.database,
            user=info.username,
            password=info.password.reveal(),
            connect_timeout=5,
        ) as conn:
            assert conn.execute("SELECT current_user").fetchone()[0] == info.username


def test_defaults_and_optional_keys(vault_manager, vault_secret):
    path = vault_secret(
        new_path(),
        server_secret(
            port=None,
            provider="mssql",
            driver="ODBC Driver 18 for SQL Server",
            options={"TrustServerCertificate": "yes"},
        ),
    )
    info = vault_manager().migration_credentials(path)
    assert info.provider == "sqlserver"
    assert info.port == 1433
    assert info.driver == "ODBC Driver 18 for SQL Server"
    assert info.options == {"TrustServerCertificate": "yes"}


def test_sqlite_needs_only_a_database_file(vault_manager, vault_secret, tmp_path):
    path = vault_secret(new_path(), {"database": str(tmp_path / "tenant.sqlite3")})
    info = vault_manager().migration_credentials(path, provider="sqlite")
    assert info.database == str(tmp_path / "tenant.sqlite3")
    assert (info.host, info.port, info.username, info.password) == (None, None, None, None)


def test_full_path_follows_the_settings(vault_manager):
    assert vault_manager().full_path("shared") == "secret/data/database/shared"
    other = vault_manager(mount_point="kv", database_secrets_path="teams/db")
    assert other.full_path("/t1/") == "kv/data/teams/db/t1"


def test_one_manager_and_one_login_per_process(vault, vault_secret):
    first, second = (
        vault_secret(new_path(), server_secret()),
        vault_secret(new_path(), server_secret()),
    )
    manager = get_secrets_manager()
    assert get_secrets_manager() is manager
    manager.migration_credentials(first, provider="postgresql")
    manager.migration_credentials(second, provider="postgresql")
    assert manager._generation == 1  # logged in once for both tenants
    process.reset()
    assert get_secrets_manager() is not manager


# --- Cache ------------------------------------------------------------------------------------


def test_reads_within_the_cache_time_reach_vault_once(vault_manager, vault_requests, vault_secret):
    path = vault_secret(new_path(), server_secret())
    clock = FakeClock()
    manager = vault_manager(cache_seconds=30, clock=clock)

    for _ in range(5):
        manager.migration_credentials(path, provider="postgresql")
        manager.application_credentials(path, provider="postgresql")
    assert vault_requests.count("GET", READ_PATH.format(path)) == 1

    clock.now += 29
    manager.migration_credentials(path, provider="postgresql")
    assert vault_requests.count("GET", READ_PATH.format(path)) == 1

    clock.now += 2
    manager.migration_credentials(path, provider="postgresql")
    manager.migration_credentials(path, provider="postgresql")
    assert vault_requests.count("GET", READ_PATH.format(path)) == 2


def test_cache_seconds_zero_reads_vault_every_time(vault_manager, vault_requests, vault_secret):
    path = vault_secret(new_path(), server_secret())
    manager = vault_manager(cache_seconds=0)
    for _ in range(3):
        manager.migration_credentials(path, provider="postgresql")
    assert vault_requests.count("GET", READ_PATH.format(path)) == 3


def test_invalidate_reads_the_new_password(vault_manager, vault_requests, vault_secret):
    path = vault_secret(new_path(), server_secret(admin_password="old-password-1"))
    manager = vault_manager(cache_seconds=300)
    assert manager.migration_credentials(path, "postgresql").password.reveal() == "old-password-1"

    vault_secret(path, server_secret(admin_password="new-password-2"))  # rotated in Vault
    assert manager.migration_credentials(path, "postgresql").password.reveal() == "old-password-1"
    manager.invalidate(path)
    assert manager.migration_credentials(path, "postgresql").password.reveal() == "new-password-2"
    assert vault_requests.count("GET", READ_PATH.format(path)) == 2


# --- Errors, each from a real server condition -------------------------------------------------


def test_missing_secret_names_the_path_and_how_to_create_it(vault_manager):
    path = new_path()
    with pytest.raises(SecretNotFound) as caught:
        vault_manager().migration_credentials(path, provider="postgresql")
    message = str(caught.value)
    assert f"secret/data/database/{path}" in message
    assert f"vault kv put secret/database/{path} admin_username=" in message


def test_token_without_read_policy_is_forbidden(vault, vault_manager, vault_secret):
    root = vault.client()
    root.sys.create_or_update_policy(
        "tests-other-only", 'path "secret/data/other/*" { capabilities = ["read"] }'
    )
    token = root.auth.token.create(policies=["tests-other-only"], ttl="5m")["auth"]["client_token"]
    path = vault_secret(new_path(), server_secret())

    with pytest.raises(VaultForbidden) as caught:
        vault_manager(token=token).migration_credentials(path, provider="postgresql")
    message = str(caught.value)
    assert f"secret/data/database/{path}" in message
    assert 'path "secret/data/database/*" { capabilities = ["read"] }' in message


def test_wrong_token_is_an_auth_error(vault_manager, vault_secret):
    path = vault_secret(new_path(), server_secret())
    with pytest.raises(VaultAuthError, match="VAULT_TOKEN"):
        vault_manager(token="s.not-a-real-token").migration_credentials(path, "postgresql")


def test_missing_keys_are_named_without_values(vault_manager, vault_secret):
    data = server_secret(host=None, app_password=None, admin_username="")
    path = vault_secret(new_path(), data)
    with pytest.raises(SecretIncomplete) as caught:
        vault_manager().migration_credentials(path, provider="postgresql")
    message = str(caught.value)
    for key in ("admin_username", "app_password", "host"):
        assert key in message
    assert data["admin_password"] not in message
    assert f"secret/data/database/{path}" in message


@pytest.mark.parametrize("port", ["five", "0", "65536", "54.32", "-1", True])
def test_bad_port_names_the_key_not_the_value(vault_manager, vault_secret, port):
    path = vault_secret(new_path(), server_secret(port=port))
    with pytest.raises(SecretIncomplete, match="'port'") as caught:
        vault_manager().migration_credentials(path, provider="postgresql")
    assert str(port) not in str(caught.value).replace(path, "")


def test_provider_mismatch_names_both(vault_manager, vault_secret):
    path = vault_secret(new_path(), server_secret(provider="mysql"))
    manager = vault_manager()
    with pytest.raises(SecretIncomplete) as caught:
        manager.migration_credentials(path, provider="postgresql")
    assert "postgresql" in str(caught.value) and "mysql" in str(caught.value)
    assert manager.migration_credentials(path, provider="mysql").port == 5432  # the secret's port


def test_no_provider_anywhere_is_incomplete(vault_manager, vault_secret):
    path = vault_secret(new_path(), server_secret())
    manager = vault_manager()
    with pytest.raises(SecretIncomplete, match="provider"):
        manager.migration_credentials(path)
    with pytest.raises(UnknownProvider):
        manager.migration_credentials(path, provider="oracle")


def test_options_must_be_an_object(vault_manager, vault_secret):
    path = vault_secret(new_path(), server_secret(options="sslmode=require"))
    with pytest.raises(SecretIncomplete, match="'options'"):
        vault_manager().migration_credentials(path, provider="postgresql")


@pytest.fixture
def throwaway_openbao():
    """A second OpenBao of its own, to seal and stop without touching the session's."""
    server = services.OpenBaoServer()
    server.start()
    yield server
    server.stop()


def test_sealed_then_stopped_vault_is_unavailable(throwaway_openbao, vault_manager):
    throwaway_openbao.client().sys.seal()
    manager = vault_manager(addr=throwaway_openbao.addr, token=throwaway_openbao.root_token)
    with pytest.raises(VaultUnavailable) as caught:
        manager.migration_credentials("anything", provider="postgresql")
    assert "sealed" in str(caught.value)
    assert throwaway_openbao.addr in str(caught.value)

    throwaway_openbao.stop()
    with pytest.raises(VaultUnavailable) as caught:
        manager.migration_credentials("anything", provider="postgresql")
    message = str(caught.value)
    assert throwaway_openbao.addr in message
    assert "VAULT_ADDR" in message and "running" in message


def test_vault_that_never_answers_is_unavailable(vault_manager):
    manager = vault_manager(addr=f"http://127.0.0.1:{services.free_port()}")
    with pytest.raises(VaultUnavailable, match="VAULT_ADDR"):
        manager.token_info()


def test_vault_that_accepts_but_never_answers_times_out(vault_manager):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        manager = vault_manager(addr=f"http://127.0.0.1:{silent.getsockname()[1]}", timeout=1)
        with pytest.raises(VaultUnavailable, match=r"within 1s \(VAULT_TIMEOUT\)"):
            manager.migration_credentials("anything", provider="postgresql")


def test_threads_share_one_login(vault_manager, vault_requests, vault_secret):
    path = vault_secret(new_path(), server_secret())
    manager = vault_manager(cache_seconds=0)
    with ThreadPoolExecutor(max_workers=8) as pool:
        infos = list(
            pool.map(lambda _: manager.migration_credentials(path, "postgresql"), range(32))
        )
    assert {info.username for info in infos} == {"migrator_admin"}
    assert vault_requests.count("GET", "/v1/auth/token/lookup-self") == 1
    assert vault_requests.count("GET", READ_PATH.format(path)) == 32


# --- Nothing leaks ----------------------------------------------------------------------------


def test_canary_password_never_leaks(vault, vault_manager, vault_secret, caplog):
    caplog.set_level(logging.DEBUG)
    canary = f"CANARY-{secrets.token_hex(8)}"
    good = vault_secret(new_path(), server_secret(admin_password=canary, app_password=canary))
    incomplete = vault_secret(new_path(), server_secret(admin_password=canary, host=None))
    bad_port = vault_secret(new_path(), server_secret(app_password=canary, port=canary))
    root = vault.client()
    root.sys.create_or_update_policy(
        "tests-other-only", 'path "secret/data/other/*" { capabilities = ["read"] }'
    )
    token = root.auth.token.create(policies=["tests-other-only"], ttl="5m")["auth"]["client_token"]

    manager = vault_manager(cache_seconds=0)
    seen = []
    for path, provider in [
        (good, "mysql"),
        (incomplete, "postgresql"),
        (bad_port, "postgresql"),
        (good, "sqlite"),
        (new_path(), "postgresql"),
    ]:
        for read in (manager.migration_credentials, manager.application_credentials):
            try:
                info = read(path, provider=provider)
            except Exception as exc:  # noqa: BLE001 - every failure is checked below
                seen.append(f"{type(exc).__name__}: {exc} {exc!r}")
            else:
                assert info.password is None or info.password.reveal() == canary
                seen.append(f"{info!r} {info} {info.password}")
    forbidden = vault_manager(token=token)
    with pytest.raises(VaultForbidden) as caught:
        forbidden.migration_credentials(good, provider="mysql")
    seen.append(str(caught.value))

    assert any("SecretIncomplete" in line for line in seen)
    assert any("ConnectionInfo(" in line for line in seen)
    assert all(canary not in line for line in seen)
    assert canary not in caplog.text
    assert "secrets" in {record.name.split(".")[-1] for record in caplog.records}


# --- manage.py vault_check --------------------------------------------------------------------


@pytest.mark.django_db
def test_vault_check_ok(vault, vault_secret, target_factory):
    data = server_secret()
    path = vault_secret(new_path(), data)
    target_factory(name="acme", provider="postgresql", vault_path=path)
    out = io.StringIO()
    call_command("vault_check", stdout=out)
    output = out.getvalue()
    assert "logged in (VAULT_AUTH_METHOD=token); policies: root;" in output
    assert f"OK    acme: secret/data/database/{path} (postgresql)" in output
    assert "All 1 targets OK." in output
    for value in data.values():
        if value not in ("postgresql", "5432"):
            assert value not in output


@pytest.mark.django_db
def test_vault_check_fails_on_a_missing_secret(vault, vault_secret, target_factory):
    data = server_secret()
    good = vault_secret(new_path(), data)
    target_factory(name="good", provider="postgresql", vault_path=good)
    target_factory(name="lost", provider="postgresql", vault_path="does-not-exist")
    out = io.StringIO()
    with pytest.raises(CommandError, match="1 of 2 targets not OK") as caught:
        call_command("vault_check", stdout=out)
    assert caught.value.returncode == 1
    output = out.getvalue()
    assert "FAIL  lost: SecretNotFound" in output
    assert "secret/data/database/does-not-exist" in output
    assert data["admin_password"] not in output and data["app_password"] not in output

    out = io.StringIO()
    call_command("vault_check", "--target", "good", stdout=out)
    assert "lost" not in out.getvalue()


@pytest.mark.django_db
def test_vault_check_says_when_vault_is_unreachable(vault, settings):
    settings.VAULT_ADDR = f"http://127.0.0.1:{services.free_port()}"
    with pytest.raises(CommandError) as caught:
        call_command("vault_check", stdout=io.StringIO())
    message = str(caught.value)
    assert "\n" not in message
    assert settings.VAULT_ADDR in message and "VAULT_ADDR" in message


def test_the_environments_proxy_settings_are_followed(vault, vault_secret, monkeypatch):
    """HTTP(S)_PROXY and NO_PROXY apply to Vault as to any requests client; they are read once
    when the process's manager is made, not on every secret read."""
    path = vault_secret(new_path(), server_secret())
    try:
        for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{services.free_port()}")  # nobody
        process.reset()
        with pytest.raises(VaultUnavailable, match="VAULT_ADDR"):
            get_secrets_manager().migration_credentials(path, provider="postgresql")

        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        process.reset()
        manager = get_secrets_manager()
        assert manager.migration_credentials(path, provider="postgresql").username
        # Changed after the manager was made: not read again for each request.
        monkeypatch.delenv("NO_PROXY")
        manager.invalidate(path)
        assert manager.migration_credentials(path, provider="postgresql").username
    finally:
        monkeypatch.undo()  # before vault_secret's own clean-up talks to OpenBao
