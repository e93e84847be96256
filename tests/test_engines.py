"""migrator.engines: URLs per provider, and connect errors mapped for an operator."""

import socket
import threading
import time
from contextlib import contextmanager

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from migrator import engines, providers
from migrator.exceptions import DatabaseAuthFailed, DatabaseUnreachable, UnknownProvider
from migrator.secrets import ConnectionInfo
from migrator.targets import Target
from tests import services

PASSWORD = "P@ss:/%word"


def info(provider, **changes):
    values = {
        "provider": provider,
        "host": "db.internal",
        "port": 5432,
        "database": "tenant_db",
        "username": "tenant_admin",
        "password": PASSWORD,
        "vault_path": "secret/data/database/abc123",
    }
    values.update(changes)
    return ConnectionInfo(**values)


@pytest.mark.parametrize(
    ("provider", "drivername"),
    [
        ("postgresql", "postgresql+psycopg"),
        ("mysql", "mysql+pymysql"),
        ("sqlserver", "mssql+pyodbc"),
    ],
)
def test_url_keeps_a_password_with_url_characters_and_never_shows_it(provider, drivername):
    url = engines.build_url(info(provider))

    assert url.drivername == drivername
    assert (url.username, url.host, url.port, url.database) == (
        "tenant_admin",
        "db.internal",
        5432,
        "tenant_db",
    )
    assert make_url(url.render_as_string(hide_password=False)).password == PASSWORD
    assert PASSWORD not in url.render_as_string(hide_password=True)
    assert PASSWORD not in repr(url)


def test_options_become_url_query_parameters():
    url = engines.build_url(info("postgresql", options={"sslmode": "require"}))

    assert url.query == {"sslmode": "require"}


def test_sqlserver_driver_comes_from_the_secret_or_the_setting(settings):
    settings.MSSQL_ODBC_DRIVER = "ODBC Driver 18 for SQL Server"
    assert engines.build_url(info("sqlserver")).query == {"driver": "ODBC Driver 18 for SQL Server"}

    url = engines.build_url(info("sqlserver", driver="FreeTDS"))
    assert url.query == {"driver": "FreeTDS", "TDS_Version": "7.4"}

    settings.MSSQL_ODBC_DRIVER = "FreeTDS"
    url = engines.build_url(info("sqlserver", options={"TDS_Version": "7.3"}))
    assert url.query == {"driver": "FreeTDS", "TDS_Version": "7.3"}


def test_sqlite_database_is_a_file_path(tmp_path):
    path = tmp_path / "tenant.sqlite3"
    url = engines.build_url(ConnectionInfo(provider="sqlite", database=str(path)))

    assert url.drivername == "sqlite+pysqlite"
    assert url.database == str(path)


def test_unknown_provider_lists_the_known_ones():
    with pytest.raises(UnknownProvider) as caught:
        engines.build_url(info("oracle"))

    message = str(caught.value)
    assert "'oracle'" in message
    for known in ("postgresql", "mysql", "sqlserver", "sqlite"):
        assert known in message


def test_dialect_names_and_aliases_find_their_provider():
    assert providers.get("mssql").name == "sqlserver"
    assert providers.get(" MariaDB ").name == "mysql"
    assert providers.for_dialect("mariadb").name == "mysql"


@pytest.mark.postgres
@pytest.mark.mysql
def test_connects_with_a_password_full_of_url_characters(server_database, target_for):
    db = server_database()
    assert any(char in db.admin_password for char in "@:/%")

    with engines.connect(target_for(db)) as connection:
        user = connection.execute(text("SELECT current_user")).scalar()

    assert user.split("@")[0] == db.admin_username


@pytest.mark.mysql
def test_mysql_connections_share_one_tls_context(mysql_database, target_for, monkeypatch):
    # PyMySQL tries TLS on each connection ("preferred") and built a new context for each,
    # loading the system's CA bundle: about 20 ms of CPU per run that has nothing to do.
    import ssl

    built = []
    create = ssl.create_default_context

    def counted(*args, **kwargs):
        built.append(args or kwargs)
        return create(*args, **kwargs)

    first, second = mysql_database(), mysql_database()  # as root, with PyMySQL's own connect
    monkeypatch.setattr(ssl, "create_default_context", counted)
    users = []
    for db in (first, second, first):
        with engines.connect(target_for(db)) as connection:
            users.append(connection.execute(text("SELECT current_user")).scalar())
        # Each as its own user, TLS still only preferred: this server offers none.
        assert connection.closed

    assert [user.split("@")[0] for user in users] == [
        first.admin_username,
        second.admin_username,
        first.admin_username,
    ]
    assert len(built) <= 1, built


@pytest.mark.postgres
@pytest.mark.mysql
def test_wrong_password_is_an_auth_failure_naming_user_and_vault_path(
    server_database, target_for, request
):
    db = server_database()
    if db.provider == "postgresql":
        _require_password_checks(request.getfixturevalue("postgres_server"))
    wrong = "Wr0ng@:/%password"

    with pytest.raises(DatabaseAuthFailed) as caught:
        with engines.connect(target_for(db, password=wrong)):
            pass

    message = str(caught.value)
    assert "abc123" in message
    assert db.admin_username in message
    assert "secret/data/database/abc123" in message
    assert wrong not in message


@pytest.mark.postgres
@pytest.mark.mysql
def test_unknown_user_is_an_auth_failure(server_database, target_for):
    db = server_database()

    with pytest.raises(DatabaseAuthFailed) as caught:
        with engines.connect(target_for(db, username="nobody_here")):
            pass

    assert "'nobody_here'" in str(caught.value)
    assert db.admin_password not in str(caught.value)


@pytest.mark.parametrize("provider", ["postgresql", "mysql"])
def test_closed_port_is_unreachable_naming_host_and_port(provider, settings):
    settings.DATABASE_CONNECT_TIMEOUT = 3
    port = services.free_port()
    target = Target("abc123", info(provider, host="127.0.0.1", port=port))

    with pytest.raises(DatabaseUnreachable) as caught:
        with engines.connect(target):
            pass

    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message
    assert "secret/data/database/abc123" in message
    assert caught.value.retryable


def test_server_that_never_answers_gives_up_after_the_connect_timeout(settings):
    """A PostgreSQL port that accepts but never speaks: the connect timeout must end the wait.
    (PyMySQL's connect_timeout covers only the TCP connect, so this is PostgreSQL only.)"""
    settings.DATABASE_CONNECT_TIMEOUT = 2
    with _silent_server() as port:
        target = Target("abc123", info("postgresql", host="127.0.0.1", port=port))
        started = time.monotonic()
        with pytest.raises(DatabaseUnreachable) as caught:
            with engines.connect(target):
                pass

    # Far below "forever"; the exact time is the driver's business.
    assert time.monotonic() - started < 15
    assert "DATABASE_CONNECT_TIMEOUT" in str(caught.value)


def test_unopenable_sqlite_file_is_unreachable(tmp_path):
    missing_dir = tmp_path / "no" / "such" / "dir" / "tenant.sqlite3"
    target = Target("abc123", ConnectionInfo(provider="sqlite", database=str(missing_dir)))

    with pytest.raises(DatabaseUnreachable) as caught:
        with engines.connect(target):
            pass

    assert str(missing_dir) in str(caught.value)


def _require_password_checks(postgres_server):
    """A local test server may trust every loopback connection (pg_hba.conf): then no password
    is checked and a wrong one cannot fail. ``.ci/run`` adds a rule for the test roles."""
    if not postgres_server.password_auth_enforced():
        message = (
            "the PostgreSQL test server does not check passwords of the test roles: add "
            f"'{services.PG_HBA_RULE}' above its trust lines in pg_hba.conf and reload it"
        )
        if services.in_ci():
            pytest.fail(message)
        pytest.skip(message)


@contextmanager
def _silent_server():
    """A loopback TCP port that accepts connections and never answers; yields the port."""
    accepted = []
    stop = threading.Event()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.settimeout(0.1)

        def accept():
            while not stop.is_set():
                try:
                    accepted.append(sock.accept()[0])
                except TimeoutError:
                    continue

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield sock.getsockname()[1]
        finally:
            stop.set()
            thread.join()
            for conn in accepted:
                conn.close()
