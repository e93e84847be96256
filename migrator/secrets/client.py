"""The Vault client's settings and its boundary: every hvac call goes through ``_transport``,
which maps the failures that mean "Vault is not there" (connection, TLS, timeout, 5xx, sealed)
to ``VaultUnavailable``, so that no ``requests`` or ``hvac`` exception reaches a caller."""

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hvac
import hvac.exceptions
import requests
from django.conf import settings

from migrator import deadlines
from migrator.exceptions import VaultUnavailable
from migrator.redaction import redact


@dataclass(frozen=True)
class VaultConfig:
    """The VAULT_* settings the manager works from (see controlplane/settings.py)."""

    addr: str
    auth_method: str = "token"
    token: str = field(default="", repr=False)
    role_id: str = ""
    secret_id: str = field(default="", repr=False)
    secret_id_file: str = ""
    approle_mount_point: str = "approle"
    kubernetes_role: str = ""
    kubernetes_jwt_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    kubernetes_mount_point: str = "kubernetes"
    namespace: str = ""
    cacert: str = ""
    mount_point: str = "secret"
    database_secrets_path: str = "database"
    database_mount_point: str = "database"
    cache_seconds: int = 300
    timeout: int = 10

    @classmethod
    def from_settings(cls) -> "VaultConfig":
        return cls(
            addr=settings.VAULT_ADDR.rstrip("/"),
            auth_method=settings.VAULT_AUTH_METHOD.strip().lower(),
            token=settings.VAULT_TOKEN,
            role_id=settings.VAULT_ROLE_ID,
            secret_id=settings.VAULT_SECRET_ID,
            secret_id_file=settings.VAULT_SECRET_ID_FILE,
            approle_mount_point=settings.VAULT_APPROLE_MOUNT_POINT.strip("/"),
            kubernetes_role=settings.VAULT_KUBERNETES_ROLE,
            kubernetes_jwt_file=settings.VAULT_KUBERNETES_JWT_FILE,
            kubernetes_mount_point=settings.VAULT_KUBERNETES_MOUNT_POINT.strip("/"),
            namespace=settings.VAULT_NAMESPACE,
            cacert=settings.VAULT_CACERT,
            mount_point=settings.VAULT_MOUNT_POINT.strip("/"),
            database_secrets_path=settings.VAULT_DATABASE_SECRETS_PATH.strip("/"),
            database_mount_point=settings.VAULT_DATABASE_MOUNT_POINT.strip("/"),
            cache_seconds=settings.VAULT_CACHE_SECONDS,
            timeout=settings.VAULT_TIMEOUT,
        )


def _environment_session(addr: str) -> requests.Session:
    """A session with the proxies the environment names for ``addr`` (HTTPS_PROXY, NO_PROXY,
    ...) read once. With requests' default ``trust_env`` every request reads the proxy
    variables and ``~/.netrc`` again: about a millisecond of each secret read (bench/README.md).
    """
    session = requests.Session()
    session.proxies.update(requests.utils.get_environ_proxies(addr))
    session.trust_env = False
    return session


def _environment_ca_bundle() -> str:
    """requests' own CA bundle variables, which ``trust_env`` would have read per request."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or ""


def _transport(config: VaultConfig, endpoint: str, call: Callable[[], Any]) -> Any:
    """Run one hvac call, mapping the failures that mean "Vault is not there" to
    VaultUnavailable. Vault's own 4xx answers are left to the caller, which knows what they
    mean for its endpoint. The call as a whole must be done within VAULT_TIMEOUT (requests'
    own timeout bounds each read only: a Vault, or a proxy, that drips its answer a byte at a
    time would hold the run for as long as it drips)."""
    with deadlines.within(config.timeout) as deadline:
        try:
            return _mapped_transport(config, endpoint, call)
        except Exception:
            if deadline.expired:
                raise VaultUnavailable(
                    f"Vault at {config.addr} ({endpoint}) did not send its whole answer within "
                    f"{config.timeout}s (VAULT_TIMEOUT): check VAULT_ADDR, and the proxy or load "
                    "balancer in front of Vault (VAULT_TIMEOUT bounds each request as a whole)."
                ) from None
            raise


def _mapped_transport(config: VaultConfig, endpoint: str, call: Callable[[], Any]) -> Any:
    where = f"Vault at {config.addr} ({endpoint})"
    check = "check VAULT_ADDR and that Vault is running and unsealed."
    try:
        return call()
    except requests.exceptions.SSLError:
        raise VaultUnavailable(
            f"{where}: TLS verification failed: check VAULT_CACERT and VAULT_ADDR."
        ) from None
    except requests.exceptions.Timeout:
        raise VaultUnavailable(
            f"{where} did not answer within {config.timeout}s (VAULT_TIMEOUT): {check}"
        ) from None
    except requests.exceptions.ConnectionError:
        raise VaultUnavailable(f"{where} cannot be reached: {check}") from None
    except requests.exceptions.RequestException as exc:
        raise VaultUnavailable(
            f"{where} gave an unusable answer ({type(exc).__name__}): {check}"
        ) from None
    except hvac.exceptions.VaultDown as exc:
        reason = _reason(exc)
        if "sealed" in reason.lower():
            raise VaultUnavailable(f"{where}: Vault is sealed; unseal it. {check}") from None
        raise VaultUnavailable(f"{where} is unavailable (503: {reason}): {check}") from None
    except (
        hvac.exceptions.InternalServerError,
        hvac.exceptions.BadGateway,
        hvac.exceptions.VaultNotInitialized,
        hvac.exceptions.RateLimitExceeded,
        hvac.exceptions.UnexpectedError,
    ) as exc:
        raise VaultUnavailable(f"{where} failed ({_reason(exc)}): {check}") from None


def _reason(exc: hvac.exceptions.VaultError) -> str:
    """Vault's own words for an error, on one line, without any registered secret."""
    if exc.errors:
        text = "; ".join(str(error) for error in exc.errors)
    else:
        text = {
            hvac.exceptions.InvalidPath: "not found",
            hvac.exceptions.Forbidden: "permission denied",
        }.get(type(exc), type(exc).__name__)
    text = " ".join(text.replace("*", " ").split())
    return redact(text)[:300]
