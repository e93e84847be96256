"""Admin users from Vault's database secrets engine: a dynamic user made for one run, whose
lease is renewed while the run goes on and revoked when it ends, or a static role's user whose
password Vault rotates; and what the run's record says about how it got its admin user."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import hvac.exceptions

from migrator.exceptions import DatabaseRoleNotFound, SecretNotFound, VaultError, VaultForbidden
from migrator.redaction import redact, register_secret
from migrator.secrets.client import _reason
from migrator.secrets.layout import ConnectionInfo, Secret, _is_text

if TYPE_CHECKING:
    from migrator.secrets.manager import SecretsManager

logger = logging.getLogger("migrator.secrets")

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

    def __init__(self, manager: SecretsManager, lease: _Lease):
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


def _issued_pair(path: str, response: Any) -> tuple[str, Secret]:
    data = (response or {}).get("data") if isinstance(response, dict) else None
    if (
        not isinstance(data, dict)
        or not _is_text(data.get("username"))
        or not _is_text(data.get("password"))
    ):
        raise VaultError(f"Vault's answer to GET /v1/{path} holds no username and password.")
    return data["username"], Secret(data["password"])


class DatabaseSecretsEngine:
    """The database secrets engine calls of ``SecretsManager`` (a mixin): it works on the
    manager's ``config`` and calls its ``_with_token`` and ``_login_description``."""

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

    def _issue(self, full: str, role_name: str) -> tuple[str, Secret, _Lease]:
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

    def _renew(self, lease: _Lease) -> int:
        """``PUT /v1/sys/leases/renew``: extend ``lease`` by its TTL; the seconds it now has."""
        response = self._with_token(
            "PUT /v1/sys/leases/renew",
            lambda client: client.sys.renew_lease(lease_id=lease.lease_id, increment=lease.seconds),
        )
        return int((response or {}).get("lease_duration") or 0)

    def _revoke(self, lease: _Lease, use: CredentialsUse) -> None:
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
