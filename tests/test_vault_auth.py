"""Logging in to a real OpenBao: AppRole, Kubernetes (against a loopback TokenReview stub),
token renewal and logging in again after a revocation."""

import secrets
import time

import pytest

from migrator.exceptions import VaultAuthError
from tests.k8s_stub import CA_CERT, TokenReviewStub, service_account_jwt

pytestmark = pytest.mark.vault

READER_POLICY = "tests-database-reader"
APPROLE_LOGIN = "/v1/auth/approle/login"


def enable_auth(client, method, path):
    if f"{path}/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method(method, path=path)


@pytest.fixture
def root(vault):
    client = vault.client()
    client.sys.create_or_update_policy(
        READER_POLICY, 'path "secret/data/database/*" { capabilities = ["read"] }'
    )
    return client


@pytest.fixture
def secret_path(vault_secret):
    return vault_secret(
        f"auth-{secrets.token_hex(4)}",
        {
            "admin_username": "admin",
            "admin_password": f"adm-{secrets.token_urlsafe(12)}",
            "app_username": "app",
            "app_password": f"app-{secrets.token_urlsafe(12)}",
            "host": "db.internal",
            "port": "5432",
            "database": "tenant",
            "provider": "postgresql",
        },
    )


@pytest.fixture
def approle(root):
    """An AppRole that may read database secrets: (role_id, secret_id)."""
    enable_auth(root, "approle", "approle")
    name = f"migrator-{secrets.token_hex(4)}"
    root.auth.approle.create_or_update_approle(name, token_policies=[READER_POLICY], token_ttl="1h")
    role_id = root.auth.approle.read_role_id(name)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(name)["data"]["secret_id"]
    yield role_id, secret_id
    root.auth.approle.delete_role(name)


# --- AppRole ----------------------------------------------------------------------------------


def test_approle_login_reads_the_secret(vault_manager, approle, secret_path):
    role_id, secret_id = approle
    manager = vault_manager(auth_method="approle", role_id=role_id, secret_id=secret_id)
    info = manager.migration_credentials(secret_path)
    assert info.username == "admin"
    token = manager.token_info()
    assert READER_POLICY in token["policies"]
    assert token["auth_method"] == "approle" and token["renewable"] and token["ttl"] > 3000


def test_approle_wrong_secret_id_says_what_to_check(vault_manager, approle, secret_path):
    role_id, _ = approle
    wrong = f"wrong-{secrets.token_hex(8)}"
    manager = vault_manager(auth_method="approle", role_id=role_id, secret_id=wrong)
    with pytest.raises(VaultAuthError) as caught:
        manager.migration_credentials(secret_path)
    message = str(caught.value)
    assert f"AppRole login failed for role id {role_id}" in message
    assert "VAULT_ROLE_ID / VAULT_SECRET_ID" in message
    assert wrong not in message


def test_approle_secret_id_from_a_file(vault_manager, approle, secret_path, tmp_path):
    role_id, secret_id = approle
    secret_file = tmp_path / "secret-id"
    secret_file.write_text(f"{secret_id}\n")
    manager = vault_manager(
        auth_method="approle", role_id=role_id, secret_id="", secret_id_file=str(secret_file)
    )
    assert manager.application_credentials(secret_path).username == "app"


def test_approle_secret_id_file_missing(vault_manager, approle, tmp_path):
    role_id, _ = approle
    missing = tmp_path / "nope"
    manager = vault_manager(
        auth_method="approle", role_id=role_id, secret_id="", secret_id_file=str(missing)
    )
    with pytest.raises(VaultAuthError, match=f"VAULT_SECRET_ID_FILE \\({missing}\\)"):
        manager.token_info()


def test_revoked_approle_token_logs_in_again(
    root, vault_manager, vault_requests, approle, secret_path
):
    role_id, secret_id = approle
    manager = vault_manager(
        auth_method="approle", role_id=role_id, secret_id=secret_id, cache_seconds=0
    )
    manager.migration_credentials(secret_path)
    root.auth.token.revoke_accessor(manager.token_info()["accessor"])

    assert manager.migration_credentials(secret_path).username == "admin"
    assert vault_requests.count("POST", APPROLE_LOGIN) == 2


def test_revoked_static_token_is_an_auth_error(root, vault_manager, secret_path):
    token = root.auth.token.create(policies=[READER_POLICY], ttl="5m")["auth"]["client_token"]
    manager = vault_manager(token=token, cache_seconds=0)
    manager.migration_credentials(secret_path)
    root.auth.token.revoke(token)
    with pytest.raises(VaultAuthError, match="check VAULT_TOKEN"):
        manager.migration_credentials(secret_path)


# --- Renewal ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_lived_token_is_renewed_while_in_use(
    root, vault_manager, vault_requests, secret_path
):
    token = root.auth.token.create(
        policies=[READER_POLICY], ttl="5s", renewable=True, explicit_max_ttl="1h"
    )["auth"]["client_token"]
    manager = vault_manager(token=token, cache_seconds=0)

    deadline = time.monotonic() + 15  # three times the token's TTL
    reads = 0
    while time.monotonic() < deadline:
        assert manager.migration_credentials(secret_path).username == "admin"
        reads += 1
        time.sleep(1)

    assert reads >= 14
    assert vault_requests.count("POST", "/v1/auth/token/renew-self") >= 2


# --- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture
def kubernetes(root):
    """Kubernetes auth at auth/kubernetes, reviewing tokens through a loopback TokenReview stub;
    role ``migrator`` is bound to service account ``migrator`` in namespace ``tenants``."""
    stub = TokenReviewStub().start()
    enable_auth(root, "kubernetes", "kubernetes")
    root.auth.kubernetes.configure(
        kubernetes_host=stub.url,
        kubernetes_ca_cert=CA_CERT,
        token_reviewer_jwt=service_account_jwt("kube-system", "token-reviewer", "uid-reviewer"),
        disable_local_ca_jwt=True,
    )
    root.auth.kubernetes.create_role(
        "migrator",
        bound_service_account_names=["migrator"],
        bound_service_account_namespaces=["tenants"],
        policies=[READER_POLICY],
        ttl="1h",
    )
    yield stub
    root.auth.kubernetes.delete_role("migrator")
    stub.stop()


def test_kubernetes_login_reads_the_secret(vault_manager, kubernetes, secret_path, tmp_path):
    jwt_file = tmp_path / "token"
    jwt_file.write_text(kubernetes.accept("tenants", "migrator", "uid-1"))
    manager = vault_manager(
        auth_method="kubernetes", kubernetes_role="migrator", kubernetes_jwt_file=str(jwt_file)
    )
    assert manager.migration_credentials(secret_path).username == "admin"
    assert READER_POLICY in manager.token_info()["policies"]
    assert kubernetes.reviews == 1


def test_kubernetes_rejected_jwt_is_an_auth_error(vault_manager, kubernetes, secret_path, tmp_path):
    jwt = service_account_jwt("tenants", "migrator", "uid-1")  # well formed, but not authentic
    jwt_file = tmp_path / "token"
    jwt_file.write_text(jwt)
    manager = vault_manager(
        auth_method="kubernetes", kubernetes_role="migrator", kubernetes_jwt_file=str(jwt_file)
    )
    with pytest.raises(VaultAuthError) as caught:
        manager.migration_credentials(secret_path)
    message = str(caught.value)
    assert "Kubernetes login failed for role migrator" in message
    assert "VAULT_KUBERNETES_ROLE" in message and str(jwt_file) in message
    assert jwt not in message
    assert kubernetes.reviews == 1
