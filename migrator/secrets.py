"""Database credentials from Vault (or OpenBao): one secrets manager over hvac per process.

Each database has one KV v2 secret,
``{VAULT_MOUNT_POINT}/data/{VAULT_DATABASE_SECRETS_PATH}/{path}``, holding an admin pair
(migrations only) and an app pair (the application at runtime)::

    vault kv put secret/database/shared admin_username=... admin_password=... \\
        app_username=... app_password=... host=... port=5432 database=...

The secret's ``admin_credentials`` key may instead send the admin user to Vault's database
secrets engine (``VAULT_DATABASE_MOUNT_POINT``): ``dynamic``, a user made for each run
(``{mount}/creds/{admin_role}``) whose lease is revoked when the run ends, or ``static-role``,
a user whose password Vault rotates (``{mount}/static-creds/{admin_role}``); host, port and
database still come from the KV secret (README: "Dynamic credentials").

``admin_credentials`` hands out the admin user for a ``with`` block in any of these modes,
``migration_credentials`` the static ones, and ``application_credentials`` the app pair,
each as a ``ConnectionInfo`` whose password is a ``Secret``: it prints as asterisks, so it cannot
end up in a log line or an error message by accident. The raw secret never leaves this module.

The manager logs in lazily (token, AppRole or Kubernetes), renews its token before it expires,
logs in again when the token was revoked, caches each secret for ``VAULT_CACHE_SECONDS`` (a
run reads its target's secret fresh all the same: ``fresh=True``), and maps every transport
error to ``migrator.exceptions`` so that no ``requests`` or ``hvac`` exception reaches a caller.
"""

import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests
from django.conf import settings

from migrator import deadlines, process, providers
from migrator.exceptions import (
    DatabaseRoleNotFound,
    MountNotKV2,
    SecretIncomplete,
    SecretNotFound,
    UnknownProvider,
    VaultAuthError,
    VaultError,
    VaultForbidden,
    VaultUnavailable,
)
from migrator.redaction import redact, register_secret

logger = logging.getLogger("migrator.secrets")

SERVER_KEYS = (
    "admin_username",
    "admin_password",
    "app_username",
    "app_password",
    "host",
    "database",
)
AUTH_METHODS = ("token", "approle", "kubernetes")
ROLES = ("admin", "app")

_MASK = "**********"
_CACHE_PRUNE_MIN = 256


class Secret:
    """A secret string that prints as asterisks; ``reveal()`` gives the value to the one caller
    that must hand it to a driver. Registered for log redaction as soon as it exists."""

    __slots__ = ("_value", "__weakref__")

    def __init__(self, value: str):
        if not isinstance(value, str):
            raise TypeError("Secret wraps a str")
        self._value = value
        register_secret(value, held_by=self)

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return _MASK

    __str__ = __repr__

    def __format__(self, format_spec: str) -> str:
        return _MASK

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)


@dataclass(frozen=True)
class ConnectionInfo:
    """How to reach one database as one user (``role``: "admin" or "app"), as read from Vault.

    ``vault_path`` is the full KV v2 path the values came from, for error messages. The password
    never appears in ``repr``; ``password.reveal()`` gives it.
    """

    provider: str
    host: str | None = None
    port: int | None = None
    database: str = ""
    username: str | None = None
    password: Secret | None = field(default=None, repr=False)
    options: dict = field(default_factory=dict, hash=False)
    driver: str | None = None
    vault_path: str = ""
    role: str = "admin"
    # PostgreSQL: the role every migration session switches to (SET ROLE) before any DDL, so
    # that what it creates is owned by a stable role, not by a user Vault made for one run.
    owner_role: str | None = None
    # Where the user and password came from when not from ``vault_path`` (dynamic and
    # static-role credentials: ``database/creds/ROLE``, ``database/static-creds/ROLE``).
    credentials_path: str = ""

    def __post_init__(self):
        if not self.database:
            raise ValueError("ConnectionInfo needs a database (a name, or a file for sqlite)")
        if self.role not in ROLES:
            raise ValueError(f"ConnectionInfo role must be one of {', '.join(ROLES)}")
        if isinstance(self.password, str):
            object.__setattr__(self, "password", Secret(self.password))


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


@dataclass
class _CachedSecret:
    data: dict = field(repr=False)
    expires_at: float
    version: int | None = None  # KV v2's version of the secret that was read


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


class SecretsManager:
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

    # --- The database secrets engine ---------------------------------------------------------

    def _database_call(self, endpoint: str, path: str, full: str, kind: str, call) -> dict:
        """One read of the database secrets engine at ``path`` (``database/creds/ROLE``), its
        refusals mapped to errors naming the path, the secret that named it and the fix."""
        mount = self.config.database_mount_point
        role_name = path.rsplit("/", 1)[-1]
        named = f"named by admin_role in the secret at {full}"
        try:
            return self._with_token(endpoint, lambda client: call(client, role_name, mount))
        except hvac.exceptions.Forbidden:
            raise VaultForbidden(
                f"The Vault token ({self._login_description()}) may not read {path} "
                f"(permission denied), {named}. Give its policy: "
                f'path "{path}" {{ capabilities = ["read"] }}'
                + (
                    f' and path "sys/leases/revoke/{path}/*" {{ capabilities = ["update"] }}'
                    if kind == "dynamic"
                    else ""
                )
                + " (README: Dynamic credentials)."
            ) from None
        except (hvac.exceptions.InvalidPath, hvac.exceptions.InvalidRequest) as exc:
            reason = _reason(exc)
            if "no handler for route" in reason:
                raise SecretNotFound(
                    f"No database secrets engine is mounted at {mount}/ in Vault "
                    f"{self.config.addr}, so {path} ({named}) cannot be read: enable it "
                    f"(`bao secrets enable -path={mount} database`) or set "
                    "VAULT_DATABASE_MOUNT_POINT to where it is mounted."
                ) from None
            # OpenBao and Vault say "unknown role: R" (400) for a role that is not there.
            if "unknown role" in reason or "role not found" in reason:
                roles = "roles" if kind == "dynamic" else "static-roles"
                make = (
                    f"bao write {mount}/roles/{role_name} db_name=... "
                    "creation_statements=... default_ttl=... max_ttl=..."
                    if kind == "dynamic"
                    else f"bao write {mount}/static-roles/{role_name} db_name=... username=... "
                    "rotation_period=..."
                )
                raise DatabaseRoleNotFound(
                    f"Vault has no {'role' if kind == 'dynamic' else 'static role'} "
                    f"{role_name} at {mount}/{roles}/{role_name} (GET /v1/{path}: {reason}), "
                    f"{named}. Create it (`{make}`; README: Dynamic credentials) or correct "
                    "admin_role in the secret."
                ) from None
            raise VaultError(
                f"Vault answered GET /v1/{path} ({named}) with an error: {reason}"
            ) from None
        except hvac.exceptions.VaultError as exc:
            raise VaultError(
                f"Vault answered GET /v1/{path} ({named}) with an error: {_reason(exc)}"
            ) from None

    def _read_static_role(self, full: str, role_name: str) -> tuple[str, Secret, str]:
        """``GET /v1/{database mount}/static-creds/{role}``: the user of a static role and its
        current password, which Vault rotates."""
        path = f"{self.config.database_mount_point}/static-creds/{role_name}"
        response = self._database_call(
            f"GET /v1/{path}",
            path,
            full,
            "static-role",
            lambda client, name, mount: client.secrets.database.get_static_credentials(
                name=name, mount_point=mount
            ),
        )
        username, password = _issued_pair(path, response)
        return username, password, path

    def _issue(self, full: str, role_name: str) -> tuple[str, Secret, "_Lease"]:
        """``GET /v1/{database mount}/creds/{role}``: a user Vault creates now, and its lease."""
        path = f"{self.config.database_mount_point}/creds/{role_name}"
        response = self._database_call(
            f"GET /v1/{path}",
            path,
            full,
            "dynamic",
            lambda client, name, mount: client.secrets.database.generate_credentials(
                name=name, mount_point=mount
            ),
        )
        username, password = _issued_pair(path, response)
        lease_id = response.get("lease_id") or ""
        lease = _Lease(
            path=path,
            lease_id=lease_id,
            seconds=int(response.get("lease_duration") or 0),
            renewable=bool(response.get("renewable")),
        )
        if lease_id:
            # The lease id's own part renews or revokes the lease: never shown, like a password.
            register_secret(lease_id.rsplit("/", 1)[-1], held_by=lease)
        logger.info(
            "Vault created user %s for this run (%s, lease %s, TTL %ss)",
            username,
            path,
            lease.safe_id,
            lease.seconds,
        )
        return username, password, lease

    def _renew(self, lease: "_Lease") -> int:
        """``PUT /v1/sys/leases/renew``: extend ``lease`` by its TTL; the seconds it now has."""
        response = self._with_token(
            "PUT /v1/sys/leases/renew",
            lambda client: client.sys.renew_lease(lease_id=lease.lease_id, increment=lease.seconds),
        )
        return int((response or {}).get("lease_duration") or 0)

    def _revoke(self, lease: "_Lease", use: "CredentialsUse") -> None:
        """``PUT /v1/sys/leases/revoke/{lease id}``, tried ``REVOKE_ATTEMPTS`` times; records
        on ``use`` whether it worked and, when not, why. Never raises: the run's outcome stands
        whatever happens here, and the lease's TTL bounds the user's life all the same."""
        if not lease.lease_id:
            use.revoked = False
            use.problem = f"Vault gave no lease for {lease.path}: nothing to revoke"
            return
        pause = REVOKE_FIRST_PAUSE
        problem = ""
        for attempt in range(1, REVOKE_ATTEMPTS + 1):
            try:
                self._with_token(
                    f"PUT /v1/sys/leases/revoke/{lease.path}/…",
                    lambda client: client.adapter.put(f"/v1/sys/leases/revoke/{lease.lease_id}"),
                )
            except hvac.exceptions.Forbidden:
                problem = (
                    f"the Vault token may not revoke it (permission denied): give its policy "
                    f'path "sys/leases/revoke/{lease.path}/*" {{ capabilities = ["update"] }}'
                )
                break  # asking again will not change a policy
            except (VaultError, hvac.exceptions.VaultError) as exc:
                problem = str(exc) if isinstance(exc, VaultError) else _reason(exc)
                logger.warning(
                    "Revoking the lease %s (user %s) failed (attempt %s of %s): %s",
                    lease.safe_id,
                    use.username,
                    attempt,
                    REVOKE_ATTEMPTS,
                    problem,
                )
                if attempt < REVOKE_ATTEMPTS:
                    time.sleep(pause)
                    pause *= 2
                continue
            use.revoked = True
            logger.info("Revoked the lease %s: Vault dropped user %s", lease.safe_id, use.username)
            return
        use.revoked = False
        use.problem = (
            f"Revoking the lease {lease.safe_id} of user {use.username} failed: {problem}. "
            f"Vault revokes it again itself when the lease ends (TTL {lease.seconds}s); to drop "
            "it now, once the cause is fixed: "
            f"`bao list sys/leases/lookup/{lease.path}` and "
            f"`bao lease revoke {lease.path}/<the id ending in {lease.lease_id[-4:]}>`."
        )
        logger.error("%s", use.problem)

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

    # --- Token lifecycle ----------------------------------------------------------------------

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

    # --- Messages -----------------------------------------------------------------------------

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

    def _login_description(self) -> str:
        config = self.config
        if config.auth_method == "approle":
            return f"AppRole role id {config.role_id}"
        if config.auth_method == "kubernetes":
            return f"Kubernetes role {config.kubernetes_role}"
        return "VAULT_TOKEN"


# --- Helpers --------------------------------------------------------------------------------


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


def _resolve_provider(
    full: str, target_provider: str | None, secret_provider: Any
) -> providers.Provider:
    """The provider, from the target and the secret's ``provider`` key (a name or an alias,
    such as ``mariadb``), which must agree."""
    known = ", ".join(providers.names())
    target = secret = None
    if target_provider:
        target = providers.find(target_provider)
        if target is None:
            raise UnknownProvider(
                f"Unknown provider {target_provider.strip().lower()!r} for {full}: use one of "
                f"{known}."
            )
    if secret_provider not in (None, ""):
        secret = providers.find(secret_provider)
        if secret is None:
            raise SecretIncomplete(
                f"The secret at {full} has a 'provider' key that is not one of {known}."
            )
    if target and secret and target is not secret:
        raise SecretIncomplete(
            f"The target's provider is {target} but the secret at {full} says "
            f"provider={secret}: correct one of them."
        )
    provider = target or secret
    if not provider:
        raise SecretIncomplete(
            f"No provider for {full}: record it on the target or add a 'provider' key "
            f"({known}) to the secret."
        )
    return provider


def _require(full: str, data: dict, keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if not _is_text(data.get(key))]
    if missing:
        raise SecretIncomplete(
            f"The secret at {full} lacks {', '.join(missing)} (each must be non-empty text): "
            f"add {'it' if len(missing) == 1 else 'them'} with "
            f"`vault kv patch {full.replace('/data/', '/', 1)} {missing[0]}=...`."
        )


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _port(full: str, value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        port = None
    elif isinstance(value, int):
        port = value
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit():
        port = int(value.strip())
    else:
        port = None
    if port is None or not 1 <= port <= 65535:
        raise SecretIncomplete(
            f"The secret at {full} has a 'port' key that is not an integer from 1 to 65535."
        )
    return port


def _options(full: str, value: Any) -> dict:
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            value = None
    if not isinstance(value, dict):
        raise SecretIncomplete(
            f"The secret at {full} has an 'options' key that is not a JSON object "
            '(e.g. {"sslmode": "require"}).'
        )
    return dict(value)


# --- Dynamic credentials --------------------------------------------------------------------

CREDENTIAL_MODES = ("static", "dynamic", "static-role")
REVOKE_ATTEMPTS = 3
REVOKE_FIRST_PAUSE = 0.5  # seconds; doubled for each next attempt


@dataclass
class CredentialsUse:
    """How one run got its admin user, for its record: never a password, never a whole lease id.

    ``mode``: static, dynamic or static-role. ``source``: the Vault path the user came from.
    ``lease``: the lease's safe form, its path and the last four characters of its id (enough
    to find it in ``bao list sys/leases/lookup/<path>``, not to renew or revoke it). ``revoked``:
    None until the run ends (and for modes without a lease), then whether the revocation
    worked; ``problem`` says why not.
    """

    mode: str
    source: str
    username: str = ""
    lease: str = ""
    lease_seconds: int = 0
    revoked: bool | None = None
    problem: str = ""

    def summary(self) -> str:
        """One line for the run's log and page."""
        if self.mode != "dynamic":
            return f"Admin credentials: {self.mode} ({self.source}, user {self.username or '-'})"
        line = (
            f"Admin credentials: dynamic, user {self.username} from {self.source}, "
            f"lease {self.lease} (TTL {self.lease_seconds}s)"
        )
        if self.revoked is True:
            return line + "; revoked after the run"
        if self.revoked is False:
            return line + f"; NOT revoked: {self.problem}"
        return line


@dataclass(frozen=True)
class AdminCredentials:
    """What ``SecretsManager.admin_credentials`` yields."""

    connection: ConnectionInfo
    use: CredentialsUse


@dataclass
class _Lease:
    path: str  # database/creds/ROLE
    lease_id: str = field(repr=False)
    seconds: int = 0
    renewable: bool = False

    @property
    def safe_id(self) -> str:
        return f"{self.path}/…{self.lease_id[-4:]}" if self.lease_id else f"{self.path}/(none)"


class _LeaseKeeper:
    """Renews a lease every third of its TTL while a run uses it, from a thread of its own
    (the run's thread is busy in Alembic). A short TTL then bounds how long the user of a dead
    worker lives, and a run longer than the TTL keeps its user."""

    def __init__(self, manager: "SecretsManager", lease: _Lease):
        self._manager = manager
        self._lease = lease
        self._stopped = threading.Event()
        self._thread = None
        if lease.renewable and lease.seconds > 0 and lease.lease_id:
            self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        period = max(1.0, self._lease.seconds / 3)
        while not self._stopped.wait(period):
            try:
                left = self._manager._renew(self._lease)
            except Exception as exc:  # noqa: BLE001 - the run goes on; the TTL still bounds it
                logger.warning(
                    "Renewing the lease %s failed: %s", self._lease.safe_id, redact(str(exc))
                )
                continue
            logger.debug("Renewed the lease %s for %ss", self._lease.safe_id, left)
            if left and left < self._lease.seconds:
                logger.warning(
                    "The lease %s reached its max TTL: Vault drops its user in %ss, even if "
                    "the run is still going (raise the role's max_ttl).",
                    self._lease.safe_id,
                    left,
                )

    def stop(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=self._manager.config.timeout + 1)


def _credentials_mode(full: str, data: dict) -> str:
    mode = data.get("admin_credentials")
    if mode in (None, ""):
        return "static"
    if not isinstance(mode, str) or mode.strip().lower() not in CREDENTIAL_MODES:
        raise SecretIncomplete(
            f"The secret at {full} has an 'admin_credentials' key that is not one of "
            f"{', '.join(CREDENTIAL_MODES)}."
        )
    return mode.strip().lower()


def _optional_text(full: str, data: dict, key: str) -> str | None:
    value = data.get(key)
    if value in (None, ""):
        return None
    if not _is_text(value):
        raise SecretIncomplete(f"The secret at {full} has a '{key}' key that is not text.")
    return value.strip()


def _issued_pair(path: str, response: Any) -> tuple[str, Secret]:
    data = (response or {}).get("data") if isinstance(response, dict) else None
    if (
        not isinstance(data, dict)
        or not _is_text(data.get("username"))
        or not _is_text(data.get("password"))
    ):
        raise VaultError(f"Vault's answer to GET /v1/{path} holds no username and password.")
    return data["username"], Secret(data["password"])


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
