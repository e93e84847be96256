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
end up in a log line or an error message by accident. The raw secret never leaves this package.

The manager logs in lazily (token, AppRole or Kubernetes), renews its token before it expires,
logs in again when the token was revoked, caches each secret for ``VAULT_CACHE_SECONDS`` (a
run reads its target's secret fresh all the same: ``fresh=True``), and maps every transport
error to ``migrator.exceptions`` so that no ``requests`` or ``hvac`` exception reaches a caller.

One module per concern:

- ``client``: ``VaultConfig`` (the VAULT_* settings), the HTTP session, and ``_transport``,
  the boundary that maps transport errors to ``VaultUnavailable``;
- ``auth``: token, AppRole and Kubernetes logins, token renewal and re-login;
- ``layout``: what a secret holds and how it is checked (``Secret``, ``ConnectionInfo``,
  the admin/app pairs, provider, port, options, ``admin_credentials``);
- ``kv``: KV v2 reads and the per-secret cache;
- ``dynamic``: the database secrets engine (dynamic users with their lease, renewal and
  revocation; static roles) and ``CredentialsUse``, what a run records of it;
- ``manager``: ``SecretsManager``, which puts them together, and the process-wide one
  (``get_secrets_manager``, registered with ``migrator.process``).
"""

from migrator.secrets.auth import AUTH_METHODS
from migrator.secrets.client import VaultConfig
from migrator.secrets.dynamic import (
    REVOKE_ATTEMPTS,
    REVOKE_FIRST_PAUSE,
    AdminCredentials,
    CredentialsUse,
)
from migrator.secrets.layout import CREDENTIAL_MODES, ROLES, SERVER_KEYS, ConnectionInfo, Secret
from migrator.secrets.manager import SecretsManager, get_secrets_manager

__all__ = [
    "AUTH_METHODS",
    "CREDENTIAL_MODES",
    "REVOKE_ATTEMPTS",
    "REVOKE_FIRST_PAUSE",
    "ROLES",
    "SERVER_KEYS",
    "AdminCredentials",
    "ConnectionInfo",
    "CredentialsUse",
    "Secret",
    "SecretsManager",
    "VaultConfig",
    "get_secrets_manager",
]
