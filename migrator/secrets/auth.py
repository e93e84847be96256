"""Logging in to Vault (token, AppRole, Kubernetes) and keeping the token alive: renewal
before it expires, a new login when Vault revoked it."""

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions

from migrator.exceptions import VaultAuthError
from migrator.redaction import register_secret
from migrator.secrets.client import _environment_ca_bundle, _reason, _transport

logger = logging.getLogger("migrator.secrets")

AUTH_METHODS = ("token", "approle", "kubernetes")


class TokenLogin:
    """The token lifecycle of ``SecretsManager`` (a mixin): it works on the manager's
    ``config``, ``_session``, ``_clock``, ``_lock`` and its token state (``_client``,
    ``_generation``, ``_token_ttl``, ``_expires_at``, ``_renewable``, ``_renewal_failed``), all
    set by ``SecretsManager.__init__``."""

    def _with_token(self, endpoint: str, call: Callable[[hvac.Client], Any]) -> Any:
        """Run ``call`` with a logged-in client. On 403, find out whether the token itself was
        rejected (revoked, expired): then log in again once and retry when the auth method can,
        or raise VaultAuthError when it cannot. A 403 on a valid token is re-raised."""
        client, generation = self._logged_in_client()
        try:
            return _transport(self.config, endpoint, lambda: call(client))
        except hvac.exceptions.Forbidden:
            if self._token_is_valid(client):
                raise
        if self.config.auth_method == "token":
            raise VaultAuthError(
                f"Vault at {self.config.addr} rejected the token in VAULT_TOKEN (it is wrong, "
                "expired or revoked): check VAULT_TOKEN."
            )
        logger.warning(
            "The Vault token was rejected (revoked or expired); logging in again with %s",
            self.config.auth_method,
        )
        with self._lock:
            if self._generation == generation:
                self._login()
        client, generation = self._logged_in_client()
        return _transport(self.config, endpoint, lambda: call(client))

    def _token_is_valid(self, client: hvac.Client) -> bool:
        """``GET /v1/auth/token/lookup-self``: False when Vault rejects the token itself."""
        try:
            _transport(self.config, "GET /v1/auth/token/lookup-self", client.auth.token.lookup_self)
        except hvac.exceptions.VaultError:
            return False
        return True

    def _logged_in_client(self) -> tuple[hvac.Client, int]:
        """The client with a live token: logs in on first use, renews a token close to expiry."""
        with self._lock:
            if self._client is None:
                self._login()
            elif self._needs_renewal():
                self._renew_or_login()
            return self._client, self._generation

    def _needs_renewal(self) -> bool:
        if self._expires_at is None or self._renewal_failed:
            return False
        return self._expires_at - self._clock() < self._token_ttl / 3

    def _renew_or_login(self) -> None:
        """``POST /v1/auth/token/renew-self``; log in again when that is refused or no longer
        extends the token (it reached its max TTL)."""
        if self._renewable:
            started = self._clock()
            try:
                response = _transport(
                    self.config,
                    "POST /v1/auth/token/renew-self",
                    lambda: self._client.auth.token.renew_self(increment=self._token_ttl),
                )
            except hvac.exceptions.VaultError as exc:
                logger.warning("Renewing the Vault token failed: %s", _reason(exc))
            else:
                lease = int((response.get("auth") or {}).get("lease_duration") or 0)
                if lease >= self._token_ttl / 3:
                    self._expires_at = started + lease
                    logger.debug("Renewed the Vault token for %ss", lease)
                    return
                logger.info("The Vault token reached its max TTL (%ss left)", lease)
        if self.config.auth_method != "token":
            self._login()
            return
        self._renewal_failed = True
        logger.warning(
            "The Vault token in VAULT_TOKEN cannot be renewed and expires in %ds: "
            "set a fresh VAULT_TOKEN before then.",
            max(0, int(self._expires_at - self._clock())),
        )

    def _login(self) -> None:
        """Log in with the configured method and remember the token's TTL. Calls
        ``GET /v1/auth/token/lookup-self`` (token), ``POST /v1/auth/{approle mount}/login``
        (AppRole) or ``POST /v1/auth/{kubernetes mount}/login`` (Kubernetes)."""
        config = self.config
        if config.auth_method not in AUTH_METHODS:
            raise VaultAuthError(
                f"VAULT_AUTH_METHOD is {config.auth_method!r}; "
                f"use one of {', '.join(AUTH_METHODS)}."
            )
        self._client = None
        client = hvac.Client(
            url=config.addr,
            token="",  # never fall back to hvac's own VAULT_TOKEN / ~/.vault-token lookup
            verify=config.cacert or _environment_ca_bundle() or True,
            timeout=config.timeout,
            namespace=config.namespace or None,
            session=self._session,
        )
        started = self._clock()
        if config.auth_method == "token":
            left, ttl, renewable = self._login_with_token(client)
        elif config.auth_method == "approle":
            left, ttl, renewable = self._login_with_approle(client)
        else:
            left, ttl, renewable = self._login_with_kubernetes(client)
        self._client = client
        self._generation += 1
        self._token_ttl = ttl
        self._expires_at = started + left if left > 0 else None
        self._renewable = renewable
        self._renewal_failed = False
        logger.info(
            "Logged in to Vault at %s with %s (token TTL %s, %srenewable)",
            config.addr,
            self._login_description(),
            f"{ttl}s" if ttl else "none",
            "" if renewable else "not ",
        )

    def _login_with_token(self, client: hvac.Client) -> tuple[int, int, bool]:
        if not self.config.token:
            raise VaultAuthError("VAULT_AUTH_METHOD is 'token' but VAULT_TOKEN is empty: set it.")
        client.token = self.config.token
        try:
            data = _transport(
                self.config, "GET /v1/auth/token/lookup-self", client.auth.token.lookup_self
            )["data"]
        except (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized) as exc:
            raise VaultAuthError(
                f"Vault at {self.config.addr} rejected the token in VAULT_TOKEN "
                f"(GET /v1/auth/token/lookup-self: {_reason(exc)}): it is wrong, expired or "
                "revoked. Check VAULT_TOKEN."
            ) from None
        except hvac.exceptions.VaultError as exc:
            raise VaultAuthError(
                f"{self.config.addr} did not answer GET /v1/auth/token/lookup-self as Vault "
                f"does ({_reason(exc)}): check VAULT_ADDR and VAULT_NAMESPACE."
            ) from None
        # Renewal extends a token by its original TTL (creation_ttl); what is left is ``ttl``.
        left = int(data.get("ttl") or 0)
        return left, int(data.get("creation_ttl") or left), bool(data.get("renewable"))

    def _login_with_approle(self, client: hvac.Client) -> tuple[int, int, bool]:
        config = self.config
        secret_id = config.secret_id or _read_file(
            config.secret_id_file, "VAULT_SECRET_ID_FILE", "the AppRole secret id"
        )
        if not config.role_id or not secret_id:
            raise VaultAuthError(
                "VAULT_AUTH_METHOD is 'approle' but VAULT_ROLE_ID or VAULT_SECRET_ID "
                "(or VAULT_SECRET_ID_FILE) is empty: set them."
            )
        register_secret(secret_id, held_by=self)
        endpoint = f"POST /v1/auth/{config.approle_mount_point}/login"
        try:
            response = _transport(
                config,
                endpoint,
                lambda: client.auth.approle.login(
                    role_id=config.role_id,
                    secret_id=secret_id,
                    mount_point=config.approle_mount_point,
                ),
            )
        except hvac.exceptions.VaultError as exc:
            raise VaultAuthError(
                f"AppRole login failed for role id {config.role_id} at {config.addr} "
                f"({endpoint}: {_reason(exc)}): check VAULT_ROLE_ID / VAULT_SECRET_ID "
                f"(or VAULT_SECRET_ID_FILE) and VAULT_APPROLE_MOUNT_POINT."
            ) from None
        return _auth_lifetime(response)

    def _login_with_kubernetes(self, client: hvac.Client) -> tuple[int, int, bool]:
        config = self.config
        if not config.kubernetes_role:
            raise VaultAuthError(
                "VAULT_AUTH_METHOD is 'kubernetes' but VAULT_KUBERNETES_ROLE is empty: set it."
            )
        jwt = _read_file(
            config.kubernetes_jwt_file, "VAULT_KUBERNETES_JWT_FILE", "the service account token"
        )
        register_secret(jwt, held_by=self)
        endpoint = f"POST /v1/auth/{config.kubernetes_mount_point}/login"
        try:
            response = _transport(
                config,
                endpoint,
                lambda: client.auth.kubernetes.login(
                    role=config.kubernetes_role,
                    jwt=jwt,
                    mount_point=config.kubernetes_mount_point,
                ),
            )
        except hvac.exceptions.VaultError as exc:
            raise VaultAuthError(
                f"Kubernetes login failed for role {config.kubernetes_role} at {config.addr} "
                f"({endpoint}: {_reason(exc)}): check VAULT_KUBERNETES_ROLE, that the role is "
                "bound to this pod's service account and namespace, the token in "
                f"VAULT_KUBERNETES_JWT_FILE ({config.kubernetes_jwt_file}) and "
                "VAULT_KUBERNETES_MOUNT_POINT."
            ) from None
        return _auth_lifetime(response)

    def _login_description(self) -> str:
        config = self.config
        if config.auth_method == "approle":
            return f"AppRole role id {config.role_id}"
        if config.auth_method == "kubernetes":
            return f"Kubernetes role {config.kubernetes_role}"
        return "VAULT_TOKEN"


def _auth_lifetime(response: dict) -> tuple[int, int, bool]:
    """(seconds left, seconds a renewal adds, renewable) of a freshly issued token."""
    auth = response.get("auth") or {}
    ttl = int(auth.get("lease_duration") or 0)
    return ttl, ttl, bool(auth.get("renewable"))


def _read_file(path: str, setting: str, what: str) -> str:
    if not path:
        raise VaultAuthError(f"{setting} is empty: set it to the file holding {what}.")
    try:
        return Path(path).read_text().strip()
    except OSError as exc:
        raise VaultAuthError(
            f"Cannot read {what} from {setting} ({path}): {exc.strerror or type(exc).__name__}."
        ) from None
