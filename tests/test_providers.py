"""The provider registry: every registered provider gives a target of its kind what the engine
asks of it (a URL, the migration lock, offline SQL, a backup file name), and a provider nobody
registered is refused with the names of those that are."""

from types import SimpleNamespace

import pytest
from sqlalchemy.dialects.mssql.pyodbc import dialect as mssql_dialect
from sqlalchemy.engine import make_url

from migrator import engines, locks, providers, runner
from migrator.exceptions import DatabaseNotFound, TargetLocked, UnknownProvider
from migrator.secrets import ConnectionInfo, Secret
from migrator.targets import Target
from tenants.models import Provider as ProviderChoice
from tests import services

NAMES = providers.names()


def server_info(name: str, tmp_path) -> ConnectionInfo:
    provider = providers.get(name)
    if provider.file_based:
        return ConnectionInfo(provider=name, database=str(tmp_path / "tenant.sqlite3"))
    return ConnectionInfo(
        provider=name,
        host="db.example",
        port=provider.default_port,
        database="tenant_a",
        username="admin",
        password=Secret("p@ss:w/rd%"),
    )


@pytest.mark.parametrize("name", NAMES)
def test_every_provider_gives_a_target_its_url(name, tmp_path):
    provider = providers.get(name)
    url = engines.build_url(server_info(name, tmp_path))

    assert url.drivername == provider.drivername
    assert "p@ss" not in url.render_as_string(hide_password=True)
    if not provider.file_based:
        assert (url.host, url.port, url.database) == (
            "db.example",
            provider.default_port,
            "tenant_a",
        )
        assert url.password == "p@ss:w/rd%"


@pytest.mark.parametrize("name", NAMES)
def test_every_provider_previews_the_chain_offline(name):
    preview = runner.sql_preview(name)

    assert preview.dialect in providers.get(name).dialects
    assert "CREATE TABLE alembic_version" in preview.sql
    assert "CREATE TABLE accounts" in preview.sql


@pytest.mark.parametrize("name", NAMES)
def test_every_provider_names_its_backup_file(name):
    # The extension a restore looks for and an operator sees in BACKUP_DIR.
    extension = providers.get(name).backup.extension

    assert extension and extension.isalnum()


class RecordingConnection:
    """A SQL Server connection's stand-in (no server here): records what the lock sends and
    answers each statement with ``answer``."""

    def __init__(self, answer):
        self.dialect = mssql_dialect()
        self.answer = answer
        self.sent = []

    def execute(self, statement, params=None):
        self.sent.append(str(statement))
        return SimpleNamespace(scalar=lambda: self.answer)

    def commit(self):
        pass

    def in_transaction(self):
        return False


@pytest.fixture
def lock_connection(request, tmp_path, target_for):
    """Factory: a connection to a database of each provider, to take its migration lock on
    (``None`` for a provider that cannot run here: its statements are checked offline)."""

    def sqlite():
        return Target("abc123", server_info("sqlite", tmp_path))

    def postgresql():
        return target_for(request.getfixturevalue("pg_database")())

    def mysql():
        return target_for(request.getfixturevalue("mysql_database")())

    # A provider registered without a way to reach a database of it here fails with KeyError.
    return {"postgresql": postgresql, "mysql": mysql, "sqlite": sqlite, "sqlserver": None}


@pytest.mark.postgres
@pytest.mark.mysql
@pytest.mark.parametrize("name", NAMES)
def test_every_provider_locks_a_target_against_a_second_run(name, lock_connection):
    make = lock_connection[name]
    if make is None:  # SQL Server: the statements the lock sends
        granted = RecordingConnection(answer=0)
        with locks.target_lock(granted, timeout=2.5, target_name="abc123"):
            pass
        assert "@LockOwner = 'Session', @LockTimeout = :timeout_ms" in granted.sent[0]
        assert granted.sent[1].startswith("EXEC sp_releaseapplock")
        with pytest.raises(TargetLocked):
            with locks.target_lock(RecordingConnection(answer=-1), timeout=0, target_name="x"):
                pass
        assert locks.is_held(RecordingConnection(answer=0)) is True
        return
    target = make()
    with engines.connect(target) as first, engines.connect(target) as second:
        with locks.target_lock(first, timeout=1, target_name=target.name):
            assert locks.is_held(second) is True
            with pytest.raises(TargetLocked, match="locked by another run"):
                with locks.target_lock(second, timeout=0, target_name=target.name):
                    pass
        assert locks.is_held(second) is False


@pytest.mark.mysql
@pytest.mark.parametrize(
    "database, lock_name",
    [
        ("t_lockname_short", "tenant_migrations:t_lockname_short"),
        # Longer than GET_LOCK's 64 characters with the prefix: the name's sha256, shortened.
        ("t_lockname_é" + "x" * 40, None),
    ],
)
def test_a_mysql_lock_has_the_name_every_version_gives_it(
    database, lock_name, mysql_server, target_for
):
    """GET_LOCK names are server-wide: a run holds its target's under the name that other
    control planes (of any version) and the `alembic` CLI ask for, its database's."""
    import hashlib

    lock_name = lock_name or (
        "tenant_migrations:" + hashlib.sha256(database.encode()).hexdigest()[:40]
    )
    db = mysql_server.create_database(database)
    target = target_for(db)
    root = mysql_server.connect()
    try:
        with engines.connect(target) as connection:
            with locks.target_lock(connection, timeout=0, target_name=target.name):
                with root.cursor() as cursor:
                    cursor.execute("SELECT IS_USED_LOCK(%s)", (lock_name,))
                    assert cursor.fetchone()[0] is not None
        with root.cursor() as cursor:
            cursor.execute("SELECT IS_USED_LOCK(%s)", (lock_name,))
            assert cursor.fetchone()[0] is None
    finally:
        root.close()
        mysql_server.drop_database(db)


@pytest.mark.postgres
@pytest.mark.mysql
@pytest.mark.parametrize("name", ["postgresql", "mysql"])
def test_a_database_missing_from_its_server_is_named(name, postgres_server, mysql_server):
    # As the server's superuser: MySQL tells a user without privileges on a database name only
    # "access denied", whether it exists or not.
    url = make_url(services.TEST_POSTGRES_URL if name == "postgresql" else services.TEST_MYSQL_URL)
    info = ConnectionInfo(
        provider=name,
        host=url.host,
        port=url.port or providers.get(name).default_port,
        database="no_such_database_here",
        username=url.username,
        password=Secret(url.password or ""),
        vault_path="secret/data/database/abc123",
    )

    with pytest.raises(DatabaseNotFound) as caught:
        with engines.connect(Target("abc123", info)):
            pass

    assert "The database 'no_such_database_here' of abc123 does not exist on" in str(caught.value)


@pytest.mark.parametrize("name", ["oracle", "", "postgresql9"])
def test_an_unknown_provider_is_refused_naming_the_known_ones(name):
    with pytest.raises(UnknownProvider) as caught:
        runner.sql_preview(name)

    message = str(caught.value)
    assert f"Unknown database provider {name!r}" in message
    assert f"use one of {', '.join(NAMES)}." in message


def test_aliases_reach_the_same_provider():
    assert runner.sql_preview("mariadb").dialect == "mysql"
    assert runner.sql_preview("postgres").dialect == "postgresql"
    assert runner.sql_preview("MSSQL").dialect == "mssql"


def test_the_admin_offers_every_registered_provider_and_no_other():
    # The model's choices stay Django choices (their order is in the migrations); they must
    # name the same providers with the same labels.
    assert {(choice.value, choice.label) for choice in ProviderChoice} == {
        (provider.name, provider.label) for provider in providers.registered()
    }
