"""The layout of a database secret in KV v2 and the values read from it: ``Secret`` (a password
that prints as asterisks), ``ConnectionInfo`` (one database as one user), and the checks that
turn a secret's keys into them, each failure a ``SecretIncomplete`` naming the key and the fix.
"""

import hmac
import json
from dataclasses import dataclass, field
from typing import Any

from migrator import providers
from migrator.exceptions import SecretIncomplete, UnknownProvider
from migrator.redaction import register_secret

SERVER_KEYS = (
    "admin_username",
    "admin_password",
    "app_username",
    "app_password",
    "host",
    "database",
)
ROLES = ("admin", "app")

_MASK = "**********"


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


CREDENTIAL_MODES = ("static", "dynamic", "static-role")


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
