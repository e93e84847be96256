"""The database providers the control plane migrates, one ``Provider`` value each.

Everything the engine knows about one kind of database lives in its module: how to reach it
(driver, URL, connect timeout, which errors mean "credentials"), its migration lock and the
session settings that bound a run's waits, whether its DDL is transactional, the catalog and
grant queries verification asks, its backup tool (dump, restore, file extension), how it quotes
a name. The engine asks the registry, never compares provider names::

    provider = providers.get("mariadb")          # a name or an alias: the MySQL provider
    provider = providers.for_dialect("mssql")    # SQLAlchemy's dialect name: SQL Server

One module per provider rather than one table per concern: adding a provider is adding one
module here (and its choice in ``tenants.models.Provider``, which a test checks against this
registry), and reading one provider's behaviour is reading one file.
"""

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.engine import Connection

from migrator.exceptions import UnknownProvider
from migrator.providers import mysql, postgresql, sqlite, sqlserver
from migrator.providers.base import LOCK_NAMESPACE, BackupTool, Provider

__all__ = [
    "LOCK_NAMESPACE",
    "BackupTool",
    "Provider",
    "autocommit",
    "find",
    "for_dialect",
    "get",
    "names",
    "registered",
]

# In the order people read them in messages ("use one of postgresql, mysql, sqlserver, sqlite").
_REGISTERED: tuple[Provider, ...] = (
    postgresql.PROVIDER,
    mysql.PROVIDER,
    sqlserver.PROVIDER,
    sqlite.PROVIDER,
)
_BY_NAME: dict[str, Provider] = {
    key: provider
    for provider in _REGISTERED
    for key in (provider.name, *provider.aliases, *provider.dialects)
}
_BY_DIALECT: dict[str, Provider] = {
    dialect: provider for provider in _REGISTERED for dialect in provider.dialects
}


def registered() -> tuple[Provider, ...]:
    """Every provider, in the order messages list them."""
    return _REGISTERED


def names() -> tuple[str, ...]:
    """The canonical names of every provider (as recorded on targets)."""
    return tuple(provider.name for provider in _REGISTERED)


def find(name: str) -> Provider | None:
    """The provider called ``name`` (its name, an alias such as ``mariadb`` or ``postgres``, or
    its SQLAlchemy dialect name such as ``mssql``; any case, spaces around ignored); None when
    there is none."""
    if not isinstance(name, str):
        return None
    return _BY_NAME.get(name.strip().lower())


def get(name: str) -> Provider:
    """The provider called ``name`` (see ``find``); raises ``UnknownProvider`` naming the known
    ones."""
    provider = find(name)
    if provider is None:
        raise UnknownProvider(
            f"Unknown database provider {name!r}: use one of {', '.join(names())}."
        )
    return provider


def for_dialect(dialect: str) -> Provider | None:
    """The provider whose SQLAlchemy dialect is ``dialect`` (``connection.dialect.name``: an
    ``alembic`` CLI URL may name any); None for a dialect no provider speaks."""
    return _BY_DIALECT.get(dialect)


@contextmanager
def autocommit(connection: Connection) -> Iterator[None]:
    """Run the block's statements in autocommit where the provider's driver switches for free
    (psycopg): the server commits each one as it runs, so a read or the lock costs one round
    trip instead of three (BEGIN, the statement, COMMIT or ROLLBACK). Elsewhere the block runs
    in transactions, as before. The connection is back in the mode it was in when the block
    ends, so Alembic still opens one transaction per revision.

    For the engine's own statements between transactions (the lock, ``alembic_version`` read,
    SET ROLE), never for a revision's. Commits and rollbacks in the block cost nothing on a
    switched connection; keep them, for the providers that do not switch.
    """
    provider = for_dialect(connection.dialect.name)
    switch = provider.autocommit if provider is not None else None
    before = switch(connection, True) if switch is not None else None
    try:
        yield
    finally:
        if before is not None:
            switch(connection, before)
