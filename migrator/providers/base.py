"""What the engine asks of a database provider: the ``Provider`` value each provider module
fills in (``migrator.providers.postgresql`` and its siblings).

Kept apart from the registry (``migrator.providers``) so that the provider modules can import
it without importing each other. Needs no Django settings to import: the ``alembic`` CLI's
``env.py`` takes the migration lock through it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.engine import URL, Connection, Engine

if TYPE_CHECKING:
    from pathlib import Path

    from sqlalchemy.engine import Dialect

    from migrator.secrets import ConnectionInfo
    from migrator.targets import Target

# The name every provider's migration lock is derived from (an advisory lock key, a GET_LOCK
# name, an application lock resource, a lock file's suffix).
LOCK_NAMESPACE = "tenant_migrations"

# What the application's user needs on every table (``migrator.verify``'s grant check).
APP_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE")

# Lets go of a lock taken by ``Provider.take_lock``.
Release = Callable[[], None]


@dataclass(frozen=True)
class BackupTool:
    """How ``migrator.backups`` backs up a database of one provider and puts a backup back.

    Either ``dump`` writes the backup into a new local file (BACKUP_DIR, checksummed, kept to
    BACKUP_RETENTION, restored under the migration lock), or ``dump_on_server`` has the server
    write it on its own host and returns that path (SQL Server: no local file, no checksum, the
    restore takes the database single-user instead of the lock). Each raises ``BackupFailed``
    or ``RestoreFailed`` naming the tool and what to check.
    """

    extension: str  # of a backup file
    dump: Callable[[Target, Path], None] | None
    dump_on_server: Callable[[Target, int], str] | None  # (target, run id) -> its path there
    restore: Callable[[Target, str], None]
    # The tables the backup at the path holds (what a restore puts back); None: not told (a
    # copy of the whole file replaces everything).
    tables_in: Callable[[Target, str], set[str] | None]

    @property
    def on_server(self) -> bool:
        return self.dump_on_server is not None


@dataclass(frozen=True, eq=False)
class Provider:
    """How the engine reaches, locks, backs up and reads one kind of database.

    One value per provider, registered in ``migrator.providers``; the engine asks it instead of
    comparing provider names. Compared by identity: there is one of each.
    """

    # --- Names
    name: str  # as recorded on targets and in secrets
    label: str  # for people (the admin's choices)
    aliases: tuple[str, ...]  # other names a secret's ``provider`` key may use
    dialects: tuple[str, ...]  # SQLAlchemy dialect names (``connection.dialect.name``)

    # --- Reaching it
    drivername: str  # SQLAlchemy dialect+driver
    # A file on this machine (SQLite): no server, no port, no users, nothing to log in as.
    file_based: bool
    default_port: int | None  # of its server
    build_url: Callable[[ConnectionInfo], URL]  # see ``engines.build_url``
    connect_args: Callable[[int], dict]  # DBAPI connect() arguments for a connect timeout
    auth_failed: Callable[[BaseException], bool]  # does this DBAPI error mean "credentials"?
    database_missing: Callable[[BaseException], bool]  # ... "no such database"?
    # ... "the user may not connect to this database" (a privilege, not the credentials)?
    connect_denied: Callable[[BaseException], bool]
    # One engine per server: the driver takes database, user and password per connection.
    server_engine: bool
    # What a new engine needs before its first connection (SQLite's transactional DDL, the
    # TLS context PyMySQL's connections share).
    prepare_engine: Callable[[Engine], None]
    # SQLAlchemy ``create_engine`` keywords for a server engine.
    server_engine_options: Mapping[str, object]
    # The dialect's default schema is the connection's database (MySQL), known without a query.
    schema_is_database: bool
    # Reads the connection's default schema into its dialect before reflection (PostgreSQL).
    refresh_default_schema: Callable[[Connection], None]
    # The session may switch to an ``owner_role`` named by the secret (SET ROLE).
    owner_role: bool
    # Switches the connection's driver into autocommit (True) or back to transactions (False)
    # between transactions, and returns the mode it was in; None when it did not switch (in a
    # transaction, a lost connection). ``providers.autocommit`` runs the engine's own statements
    # so. None on a provider whose driver pays a round trip to switch (PyMySQL's SET
    # AUTOCOMMIT): there they run in transactions.
    autocommit: Callable[[Connection, bool], bool | None] | None

    # --- The migration lock (``migrator.locks``)
    # Takes the lock within ``timeout`` seconds, setting ``session_settings`` for the session;
    # returns how to release it, or None when another session holds it.
    take_lock: Callable[[Connection, float, Mapping[str, str]], Release | None]
    lock_held: Callable[[Connection], bool]  # asked without taking it
    session_lock: bool  # the server releases it with the session
    # Session settings that bound a migration's waits (PostgreSQL's lock_timeout); {} for none.
    session_settings: Callable[[Dialect], dict[str, str]]
    # What lock wait a DBAPI error ended (the session setting's timeout), else None.
    lock_wait: Callable[[BaseException], tuple[str, str] | None]
    waited_lock: str  # what a statement waits for: "a metadata lock"
    find_session: str  # where to find the session that held it: "in pg_stat_activity"

    # --- The catalog (``migrator.schema``)
    # A digest of every catalog entry reflection reads, in one query, so that a schema seen
    # before needs no reflection (PostgreSQL); None: reflect every time. Sets the dialect's
    # default schema, leaves the query's transaction open.
    catalog_digest: Callable[[Connection], str] | None
    unique_constraints_are_indexes: bool  # the inspector lists them with the indexes (MySQL)

    # --- Verification (``migrator.verify``)
    # The setting naming a server to build reference schemas on; None: none can be (a file
    # based provider builds it in a temporary directory).
    scratch_setting: str | None
    # The statement dropping a scratch database; None where none is made.
    drop_database: Callable[[str], str] | None
    # Asks the server what the app user may do on the tables; fills the ``GrantCheck``; False
    # when the role does not exist. None: the provider's grants are not checked.
    app_grants: Callable[..., bool] | None
    grants_asked_as_admin: bool  # asked about the app role on the admin connection
    grants_login_database: str | None  # the database the app user logs in to, to ask

    # --- DDL semantics
    transactional_ddl: bool  # a failed revision rolls back whole
    # Why a failed revision may be partly applied (empty with transactional DDL); the one text
    # every message about it starts from.
    partial_ddl: str

    # --- Backups (``migrator.backups``)
    backup: BackupTool

    # --- SQL
    quote: Callable[[str], str]  # an identifier (a database name) for a statement

    def __str__(self) -> str:
        return self.name


def no_schema_refresh(connection: Connection) -> None:
    """For providers whose default schema needs no reading."""


def no_engine_preparation(engine: Engine) -> None:
    """For providers whose engines need nothing before their first connection."""


def no_session_settings(dialect: Dialect) -> dict[str, str]:
    """For providers whose sessions get no settings."""
    return {}


def refuse_session_settings(name: str, session_settings: Mapping[str, str]) -> None:
    """Raises ``ValueError`` for a lock asked to set session settings a provider has none of."""
    if session_settings:
        raise ValueError(f"session settings are only set on PostgreSQL and MySQL, not {name}")


def never(error: BaseException) -> bool:
    """For a kind of DBAPI error a provider's driver does not report."""
    return False


def no_lock_wait(error: BaseException) -> tuple[str, str] | None:
    """For providers whose migration session sets no lock timeout."""
    return None


def server_url(drivername: str, info: ConnectionInfo, query: Mapping[str, str]) -> URL:
    """The URL of a database on a server: ``URL.create`` takes the user and password as they
    are, so ``@``, ``:``, ``/`` or ``%`` in them need no quoting."""
    return URL.create(
        drivername,
        username=info.username,
        password=info.password.reveal() if info.password is not None else None,
        host=info.host,
        port=info.port,
        database=info.database,
        query=dict(query),
    )


def url_query(info: ConnectionInfo) -> dict[str, str]:
    """``info.options`` as URL query parameters (``sslmode``)."""
    return {str(key): str(value) for key, value in info.options.items()}
