"""Fixtures on real services. See tests/services.py for how each service is found."""

import pytest

from controlplane import devservices
from tests import services
from tests.dispatch_fixtures import registered_tenant  # noqa: F401
from tests.model_fixtures import target_factory, tenant_factory  # noqa: F401


@pytest.fixture(autouse=True)
def _fresh_process_state():
    """Each test starts as a new worker process would (``migrator.process.reset()``: no script
    directory read, no Vault login, no engine, no cached schema, no statuses reconciled), and so
    does whatever a test does after changing a setting: the process state is built from the
    settings, which only tests change while the process runs."""
    from django.test.signals import setting_changed

    from migrator import process

    def settings_changed(**kwargs):
        process.reset()

    process.reset()
    setting_changed.connect(settings_changed, weak=False, dispatch_uid="process-state")
    yield
    setting_changed.disconnect(dispatch_uid="process-state")
    process.reset()


@pytest.fixture(autouse=True)
def _fresh_rate_limits():
    """The API's throttles and the admin login's failure counts live in the (per-process, local
    memory) cache: each test starts with none, whatever the tests before it tried."""
    from django.core.cache import cache

    cache.clear()


@pytest.fixture(scope="session")
def postgres_server():
    return services.require(services.PostgresServer(services.TEST_POSTGRES_URL).ping)


@pytest.fixture(scope="session")
def mysql_server():
    return services.require(services.MySQLServer(services.TEST_MYSQL_URL).ping)


@pytest.fixture
def pg_database(postgres_server):
    """Factory: a throw-away PostgreSQL database with its own admin and app roles."""
    made = []

    def make():
        db = postgres_server.create_database()
        made.append(db)
        return db

    yield make
    for db in made:
        postgres_server.drop_database(db)


@pytest.fixture
def mysql_database(mysql_server):
    """Factory: a throw-away MariaDB/MySQL database with its own admin and app users."""
    made = []

    def make():
        db = mysql_server.create_database()
        made.append(db)
        return db

    yield make
    for db in made:
        mysql_server.drop_database(db)


@pytest.fixture(params=["postgresql", "mysql"])
def server_database(request):
    """Factory parametrised over both real servers: the same test runs on each."""
    fixture = {"postgresql": "pg_database", "mysql": "mysql_database"}[request.param]
    return request.getfixturevalue(fixture)


@pytest.fixture(scope="session")
def openbao():
    """A real OpenBao dev server for the whole session."""
    server = services.require(services.OpenBaoServer().start)
    yield server
    server.stop()


@pytest.fixture
def vault(openbao, settings):
    """Point the control plane at the session's OpenBao with its root token."""
    settings.VAULT_ADDR = openbao.addr
    settings.VAULT_AUTH_METHOD = "token"
    settings.VAULT_TOKEN = openbao.root_token
    settings.VAULT_MOUNT_POINT = "secret"
    settings.VAULT_DATABASE_SECRETS_PATH = "database"
    return openbao


@pytest.fixture
def vault_secret(openbao):
    """Factory: write a KV v2 secret under secret/database/<path>; deleted afterwards."""
    client = openbao.client()
    written = []

    def write(path, data):
        openbao.write_secrets({path: data})
        written.append(path)
        return path

    yield write
    for path in written:
        client.secrets.kv.v2.delete_metadata_and_all_versions(
            path=f"database/{path}", mount_point="secret"
        )


@pytest.fixture(scope="session")
def redis_url():
    return services.require(lambda: devservices.ping_redis(services.TEST_REDIS_URL))


@pytest.fixture
def vault_requests():
    """The HTTP session of the managers made by ``vault_manager``. ``.sent`` lists (METHOD,
    path) of every answered request; ``.count(method, path)`` counts one kind."""
    from urllib.parse import urlsplit

    import requests

    session = requests.Session()
    session.sent = []

    def record(response, *args, **kwargs):
        session.sent.append((response.request.method, urlsplit(response.request.url).path))

    session.hooks["response"].append(record)
    session.count = lambda method, path: session.sent.count((method.upper(), path))
    yield session
    session.close()


@pytest.fixture
def vault_manager(vault, settings, vault_requests):
    """Factory: a SecretsManager on the session's OpenBao (root token unless overridden).

    Keywords override VAULT_* settings (``cache_seconds=0`` sets VAULT_CACHE_SECONDS);
    ``clock`` replaces time.monotonic. Every manager sends through ``vault_requests``.
    """
    import time

    from migrator.secrets import SecretsManager

    made = []

    def make(*, clock=time.monotonic, **overrides):
        for name, value in overrides.items():
            setattr(settings, f"VAULT_{name.upper()}", value)
        manager = SecretsManager.from_settings(session=vault_requests, clock=clock)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.close()


@pytest.fixture
def target_for():
    """Factory: a ``migrator.targets.Target`` reaching a throw-away database as its admin user,
    built the way the secrets manager builds one from the database's Vault secret."""
    from migrator.secrets import ConnectionInfo
    from migrator.targets import Target

    def make(db, name="abc123", **changes):
        info = {
            "provider": db.provider,
            "host": db.host,
            "port": db.port,
            "database": db.database,
            "username": db.admin_username,
            "password": db.admin_password,
            "vault_path": f"secret/data/database/{name}",
        }
        info.update(changes)
        return Target(name, ConnectionInfo(**info))

    return make
