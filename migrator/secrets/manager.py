"""The secrets manager: one per process (``get_secrets_manager``), reading database credentials
in whichever mode the secret names, registered with ``migrator.process``."""

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import hvac
import hvac.exceptions
import requests

from migrator import deadlines, process, providers
from migrator.exceptions import SecretIncomplete, VaultError, VaultForbidden
from migrator.secrets.auth import TokenLogin
from migrator.secrets.client import VaultConfig, _environment_session, _reason
from migrator.secrets.dynamic import (
    AdminCredentials,
    CredentialsUse,
    DatabaseSecretsEngine,
    _Lease,
    _LeaseKeeper,
)
from migrator.secrets.kv import _CACHE_PRUNE_MIN, KV2Reads, _CachedSecret
from migrator.secrets.layout import (
    SERVER_KEYS,
    ConnectionInfo,
    Secret,
    _credentials_mode,
    _optional_text,
    _options,
    _port,
    _require,
    _resolve_provider,
)

logger = logging.getLogger("migrator.secrets")


class SecretsManager(TokenLogin, KV2Reads, DatabaseSecretsEngine):
    """Reads database credentials from Vault for one process. Thread-safe.

    Build it with ``from_settings()``, or take the process-wide one from ``get_secrets_manager()``.
    ``session`` (a ``requests.Session``) and ``clock`` (seconds, monotonic) are for tests.
    """

    def __init__(
        self,
        config: VaultConfig,
        *,
        session: requests.Session | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        # One connection pool for the manager's life, shared by every login's client.
        self._owns_session = session is None
        self._session = session or _environment_session(config.addr)
        deadlines.enforce_on(self._session)  # VAULT_TIMEOUT bounds each request as a whole
        self._clock = clock
        self._lock = threading.RLock()
        self._client: hvac.Client | None = None
        self._generation = 0  # counts logins, so concurrent callers re-login only once
        self._token_ttl = 0  # seconds the token lives after login or renewal; 0: never expires
        self._expires_at: float | None = None
        self._renewable = False
        self._renewal_failed = False
        self._cache: dict[str, _CachedSecret] = {}
        self._prune_at = _CACHE_PRUNE_MIN  # cache size at which expired entries are dropped

    @classmethod
    def from_settings(cls, **kwargs) -> "SecretsManager":
        """A manager for the VAULT_* settings; keyword arguments go to the constructor."""
        return cls(VaultConfig.from_settings(), **kwargs)

    # --- Public interface ---------------------------------------------------------------------

    def full_path(self, path: str) -> str:
        """The KV v2 API path of a database secret, e.g. ``secret/data/database/shared``."""
        return f"{self.config.mount_point}/data/{self._relative_path(path)}"

    def migration_credentials(
        self, path: str, provider: str | None = None, *, fresh: bool = False
    ) -> ConnectionInfo:
        """The admin user of the database whose secret is at ``path`` (relative to
        VAULT_DATABASE_SECRETS_PATH), for migrations. Reads (or takes from the cache)
        ``GET /v1/{mount}/data/{database_secrets_path}/{path}``; for a secret that says
        ``admin_credentials=static-role``, also ``GET /v1/{database mount}/static-creds/{role}``
        (always fresh: Vault rotates that password).

        ``provider`` is the provider recorded on the target; the secret's optional ``provider``
        key must agree with it. ``fresh``: read the latest version from Vault whatever the cache
        holds (and cache it), for a run that decides what to do to the database the secret
        names: a secret changed to point at another database must never be missed. Raises a
        ``VaultError`` subclass on any failure. A secret that says
        ``admin_credentials=dynamic`` needs a lease that is revoked afterwards: use
        ``admin_credentials()``, which works for every mode.
        """
        info, _use, lease = self._admin(path, provider, fresh=fresh, issue=False)
        return info

    def database_server(
        self, path: str, provider: str | None = None
    ) -> tuple[str | None, int | None]:
        """(host, port) of the database server the secret at ``path`` names, whatever the mode
        of its admin credentials (None, None for SQLite). Reads (or takes from the cache)
        ``GET /v1/{mount}/data/{database_secrets_path}/{path}``; makes no user."""
        full = self.full_path(path)
        data = self._secret_data(self._relative_path(path))
        provider = _resolve_provider(full, provider, data.get("provider"))
        if provider.file_based:
            return None, None
        _require(full, data, ("host",))
        return data["host"], _port(full, data.get("port"), provider.default_port)

    @contextmanager
    def admin_credentials(
        self, path: str, provider: str | None = None, *, fresh: bool = False
    ) -> Iterator["AdminCredentials"]:
        """The admin user of the database whose secret is at ``path``, for the ``with`` block,
        in whichever mode the secret's ``admin_credentials`` key names (README: "Dynamic
        credentials"):

        * ``static`` (the default): ``admin_username`` / ``admin_password`` of the KV secret;
        * ``static-role``: ``GET /v1/{database mount}/static-creds/{admin_role}``, read fresh;
        * ``dynamic``: ``GET /v1/{database mount}/creds/{admin_role}``, a user Vault creates for
          this block. Its lease is renewed while the block runs (``PUT /v1/sys/leases/renew``,
          every third of its TTL) and revoked when it ends, however it ends
          (``PUT /v1/sys/leases/revoke/{lease id}``, tried ``REVOKE_ATTEMPTS`` times): a worker
          that dies leaves a user that Vault drops when the lease's TTL runs out.

        Yields an ``AdminCredentials``: ``connection`` (a ``ConnectionInfo``) and ``use`` (a
        ``CredentialsUse`` for the record: mode, path, user, the lease's safe form and, once
        the block has ended, whether the revocation succeeded). Never holds a password.
        """
        info, use, lease = self._admin(path, provider, fresh=fresh, issue=True)
        if lease is None:
            yield AdminCredentials(info, use)
            return
        keeper = _LeaseKeeper(self, lease)
        try:
            yield AdminCredentials(info, use)
        finally:
            keeper.stop()
            self._revoke(lease, use)

    def application_credentials(self, path: str, provider: str | None = None) -> ConnectionInfo:
        """The app user of the database whose secret is at ``path``, for the application at
        runtime. Reads (or takes from the cache)
        ``GET /v1/{mount}/data/{database_secrets_path}/{path}``.
        """
        return self._application(path, provider)

    def invalidate(self, path: str | None = None) -> None:
        """Forget the cached secret at ``path`` (every cached secret when ``path`` is None), so
        that the next read goes to Vault: call it when a database rejects cached credentials."""
        with self._lock:
            if path is None:
                self._cache.clear()
            else:
                self._cache.pop(self._relative_path(path), None)

    def token_info(self) -> dict:
        """What Vault knows of the manager's token, from ``GET /v1/auth/token/lookup-self``:
        ``display_name``, ``policies``, ``ttl`` (seconds left, 0 for a token that never
        expires), ``renewable``, ``expire_time``, ``accessor`` (not the token itself) and the
        ``auth_method`` used. Logs in first if needed."""
        try:
            data = self._with_token(
                "GET /v1/auth/token/lookup-self", lambda client: client.auth.token.lookup_self()
            )["data"]
        except hvac.exceptions.VaultError as exc:
            raise VaultForbidden(
                f"Vault at {self.config.addr} refused GET /v1/auth/token/lookup-self "
                f"({_reason(exc)}): the token's policies should include Vault's 'default' policy."
            ) from None
        return {
            "auth_method": self.config.auth_method,
            "display_name": data.get("display_name", ""),
            "policies": list(data.get("policies") or []),
            "ttl": int(data.get("ttl") or 0),
            "renewable": bool(data.get("renewable")),
            "expire_time": data.get("expire_time"),
            "accessor": data.get("accessor", ""),
        }

    def close(self) -> None:
        """Drop the token and the cache, and close the HTTP session (unless it was passed in)."""
        with self._lock:
            self._client = None
            self._expires_at = None
            self._cache.clear()
            if self._owns_session:
                self._session.close()

    # --- Credentials --------------------------------------------------------------------------

    def _application(self, path: str, provider: str | None) -> ConnectionInfo:
        """The app pair of the secret at ``path``."""
        role = "app"
        relative = self._relative_path(path)
        full = self.full_path(path)
        data = self._secret_data(relative)
        provider = _resolve_provider(full, provider, data.get("provider"))
        if provider.file_based:
            return self._file_info(full, data, provider, role)
        # A secret whose admin user comes from the database secrets engine holds no admin pair.
        static = _credentials_mode(full, data) == "static"
        _require(
            full,
            data,
            SERVER_KEYS if static else ("app_username", "app_password", "host", "database"),
        )
        return self._server_info(
            full, data, provider, role, data["app_username"], Secret(data["app_password"])
        )

    def _admin(
        self, path: str, provider: str | None, *, fresh: bool, issue: bool
    ) -> tuple[ConnectionInfo, "CredentialsUse", "_Lease | None"]:
        """The admin ``ConnectionInfo`` of the secret at ``path``, how it was obtained, and the
        lease to revoke afterwards (dynamic credentials, when ``issue``)."""
        relative = self._relative_path(path)
        full = self.full_path(path)
        data = self._secret_data(relative, fresh=fresh)
        provider = _resolve_provider(full, provider, data.get("provider"))
        mode = _credentials_mode(full, data)
        if provider.file_based:
            if mode != "static":
                raise SecretIncomplete(
                    f"The secret at {full} says admin_credentials={mode}, but a SQLite database "
                    "has no users: remove admin_credentials."
                )
            info = self._file_info(full, data, provider, "admin")
            return info, CredentialsUse("static", full), None
        owner_role = _optional_text(full, data, "owner_role")
        if mode == "static":
            _require(full, data, SERVER_KEYS)
            info = self._server_info(
                full,
                data,
                provider,
                "admin",
                data["admin_username"],
                Secret(data["admin_password"]),
                owner_role=owner_role,
            )
            return info, CredentialsUse("static", full, username=info.username or ""), None
        _require(full, data, ("host", "database", "admin_role"))
        role_name = data["admin_role"].strip()
        if mode == "dynamic" and provider.owner_role and not owner_role:
            raise SecretIncomplete(
                f"The secret at {full} says admin_credentials=dynamic but names no owner_role: "
                "what a user Vault made for one run creates must belong to a role that outlives "
                "it (PostgreSQL will not drop a role that owns tables). Add it with "
                f"`vault kv patch {full.replace('/data/', '/', 1)} owner_role=...` and grant it "
                f'in the Vault role\'s creation_statements: GRANT "OWNER" TO "{{{{name}}}}";'
            )
        if mode == "static-role":
            username, password, source = self._read_static_role(full, role_name)
            lease = None
        elif not issue:
            raise VaultError(
                f"The secret at {full} says admin_credentials=dynamic: its admin user is made "
                "for one run and revoked after it, so it is read with admin_credentials(), "
                "never on its own (a bug in the caller)."
            )
        else:
            username, password, lease = self._issue(full, role_name)
            source = lease.path
        info = self._server_info(
            full,
            data,
            provider,
            "admin",
            username,
            password,
            owner_role=owner_role,
            credentials_path=source,
        )
        use = CredentialsUse(
            mode,
            source,
            username=username,
            lease=lease.safe_id if lease else "",
            lease_seconds=lease.seconds if lease else 0,
        )
        return info, use, lease

    def _file_info(
        self, full: str, data: dict, provider: providers.Provider, role: str
    ) -> ConnectionInfo:
        _require(full, data, ("database",))
        return ConnectionInfo(
            provider=provider.name,
            database=data["database"],
            options=_options(full, data.get("options")),
            vault_path=full,
            role=role,
        )

    def _server_info(
        self,
        full: str,
        data: dict,
        provider: providers.Provider,
        role: str,
        username: str,
        password: Secret,
        *,
        owner_role: str | None = None,
        credentials_path: str = "",
    ) -> ConnectionInfo:
        driver = data.get("driver") or None
        if driver is not None and not isinstance(driver, str):
            raise SecretIncomplete(f"The secret at {full} has a 'driver' key that is not text.")
        return ConnectionInfo(
            provider=provider.name,
            host=data["host"],
            port=_port(full, data.get("port"), provider.default_port),
            database=data["database"],
            username=username,
            password=password,
            options=_options(full, data.get("options")),
            driver=driver,
            vault_path=full,
            role=role,
            owner_role=owner_role if provider.owner_role else None,
            credentials_path=credentials_path,
        )


# --- The process-wide manager ---------------------------------------------------------------

_manager: SecretsManager | None = None
_manager_lock = threading.Lock()


def get_secrets_manager() -> SecretsManager:
    """The process's one SecretsManager (one Vault login per worker process), made on first use
    from the VAULT_* settings. A forked worker makes its own (``_forget_manager_after_fork``)."""
    global _manager
    with _manager_lock:
        if _manager is None:
            _manager = SecretsManager.from_settings()
        return _manager


def _close_manager() -> None:
    """Drop the process's SecretsManager and close its HTTP session; the next
    ``get_secrets_manager()`` logs in again (``process.reset()``: after a settings change,
    between tests)."""
    global _manager
    with _manager_lock:
        if _manager is not None:
            _manager.close()
        _manager = None


def _forget_manager_after_fork() -> None:
    # The parent's token and connections are not the child's to use, nor to close: the child
    # logs in on its own. The lock is new: a thread of the parent may have held it at the fork.
    global _manager, _manager_lock
    _manager = None
    _manager_lock = threading.Lock()


process.register("secrets.manager", reset=_close_manager, after_fork=_forget_manager_after_fork)
