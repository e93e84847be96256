"""Reading database secrets from KV v2, and the cache that keeps each for VAULT_CACHE_SECONDS."""

import logging
from dataclasses import dataclass, field

import hvac.exceptions

from migrator.exceptions import MountNotKV2, SecretNotFound, VaultError, VaultForbidden
from migrator.redaction import register_secret
from migrator.secrets.client import _reason

logger = logging.getLogger("migrator.secrets")

_CACHE_PRUNE_MIN = 256


@dataclass
class _CachedSecret:
    data: dict = field(repr=False)
    expires_at: float
    version: int | None = None  # KV v2's version of the secret that was read


class KV2Reads:
    """The KV v2 reads of ``SecretsManager`` (a mixin): it works on the manager's ``config``,
    ``_lock``, ``_clock``, ``_cache`` and ``_prune_at`` and calls its ``_with_token``."""

    def _secret_data(self, relative: str, *, fresh: bool = False) -> dict:
        """The secret's key/value pairs, from the cache (unless ``fresh``) or from Vault."""
        cached = None
        if self.config.cache_seconds > 0:
            with self._lock:
                cached = self._cache.get(relative)
                if not fresh and cached is not None and cached.expires_at > self._clock():
                    return cached.data
        data, version = self._read_secret(relative)
        if cached is not None and version is not None and cached.version not in (None, version):
            logger.info(
                "The secret at %s/data/%s changed in Vault (version %s, then %s)",
                self.config.mount_point,
                relative,
                cached.version,
                version,
            )
        if self.config.cache_seconds > 0:
            with self._lock:
                now = self._clock()
                self._cache[relative] = _CachedSecret(
                    data=data, expires_at=now + self.config.cache_seconds, version=version
                )
                if len(self._cache) >= self._prune_at:
                    # A worker reads each target of a large fleet once per pass: without this,
                    # every secret it ever read would stay in memory after it expired.
                    for key in [k for k, c in self._cache.items() if c.expires_at <= now]:
                        del self._cache[key]
                    self._prune_at = max(_CACHE_PRUNE_MIN, 2 * len(self._cache))
        return data

    def _read_secret(self, relative: str) -> tuple[dict, int | None]:
        """``GET /v1/{mount}/data/{database_secrets_path}/{path}``: the latest version's data,
        and its version number (KV v2's ``metadata.version``)."""
        full = f"{self.config.mount_point}/data/{relative}"
        try:
            response = self._with_token(
                f"GET /v1/{full}",
                lambda client: client.secrets.kv.v2.read_secret_version(
                    path=relative,
                    mount_point=self.config.mount_point,
                    raise_on_deleted_version=True,
                ),
            )
        except hvac.exceptions.Forbidden:
            raise VaultForbidden(
                f"The Vault token ({self._login_description()}) may not read {full} "
                "(permission denied). Give its policy: "
                f'path "{self._policy_path()}" {{ capabilities = ["read"] }}'
            ) from None
        except hvac.exceptions.InvalidPath as exc:
            if "no handler for route" in _reason(exc):
                raise SecretNotFound(
                    f"No secrets engine is mounted at {self.config.mount_point}/ in Vault "
                    f"{self.config.addr}, so {full} cannot exist: check VAULT_MOUNT_POINT "
                    f"(a KV version 2 mount)."
                ) from None
            if self._mount_version() == "1":
                mount = self.config.mount_point
                raise MountNotKV2(
                    f"The secrets engine at {mount}/ in Vault {self.config.addr} is KV version 1; "
                    f"the control plane reads KV version 2 ({full}). Upgrade the mount "
                    f"(vault kv enable-versioning {mount}/) or point VAULT_MOUNT_POINT at a KV "
                    "version 2 mount."
                ) from None
            raise SecretNotFound(
                f"No secret at {full} in Vault {self.config.addr}. Create it with: "
                f"{self._put_command(relative)}"
            ) from None
        except hvac.exceptions.VaultError as exc:
            raise VaultError(
                f"Vault answered GET /v1/{full} with an error: {_reason(exc)}"
            ) from None
        data = (response.get("data") or {}).get("data")
        if not isinstance(data, dict):
            raise SecretNotFound(
                f"The secret at {full} has no data. Create it with: {self._put_command(relative)}"
            )
        for key, value in data.items():
            if "password" in key.lower() and isinstance(value, str):
                register_secret(value)
        logger.debug("Read secret %s (keys: %s)", full, ", ".join(sorted(data)))
        version = ((response.get("data") or {}).get("metadata") or {}).get("version")
        return data, version if isinstance(version, int) else None

    def _mount_version(self) -> str | None:
        """``GET /v1/sys/internal/ui/mounts/{mount}``: the KV version of VAULT_MOUNT_POINT ("1",
        "2"), asked only when a secret was not found there; None when Vault does not say."""
        mount = self.config.mount_point
        try:
            answer = self._with_token(
                f"GET /v1/sys/internal/ui/mounts/{mount}",
                lambda client: client.adapter.get(f"/v1/sys/internal/ui/mounts/{mount}"),
            )
        except (VaultError, hvac.exceptions.VaultError):
            return None
        data = (answer or {}).get("data") if isinstance(answer, dict) else None
        if not isinstance(data, dict) or data.get("type") not in ("kv", "generic"):
            return None
        return str((data.get("options") or {}).get("version") or "1")

    def _relative_path(self, path: str) -> str:
        path = (path or "").strip("/")
        if not path:
            raise ValueError("A Vault secret path is required")
        base = self.config.database_secrets_path
        return f"{base}/{path}" if base else path

    def _policy_path(self) -> str:
        return self.full_path("*")

    def _put_command(self, relative: str) -> str:
        return (
            f"vault kv put {self.config.mount_point}/{relative} admin_username=... "
            "admin_password=... app_username=... app_password=... host=... port=... database=..."
        )
