"""Real services for the tests: PostgreSQL, MariaDB/MySQL, OpenBao (Vault) and Redis, from
``controlplane.devservices`` (the demo and the bench use the same).

Each is found through an environment variable with a local default. When one cannot be reached,
tests that need it are skipped on a developer machine and fail loudly under ``CI=true``, with a
message saying how to start it: CI never turns a missing service into silent skips.
"""

import os
import secrets

import pytest

from controlplane import devservices
from controlplane.devservices import (  # noqa: F401 - the names the tests use
    PASSWORD_CHECKED_GROUP,
    PG_HBA_RULE,
    MySQLServer,
    OpenBaoServer,
    PostgresServer,
    free_port,
    in_ci,
    new_password,
)

TEST_POSTGRES_URL = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TEST_MYSQL_URL = os.environ.get("TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/mysql")
TEST_REDIS_URL = os.environ.get(
    "TEST_REDIS_URL", os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/15")
)
TEST_MSSQL_URL = os.environ.get("TEST_MSSQL_URL", "")


def unavailable(service: str, reason: str):
    """Skip (developer machine) or fail (CI) a test whose service cannot be reached."""
    message = str(devservices.ServiceUnavailable(service, reason))
    if in_ci():
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def require(start):
    """What ``start()`` returns (a server's ``ping`` or ``start``); when it raises
    ServiceUnavailable, the test is skipped, or failed under CI=true."""
    try:
        return start()
    except devservices.ServiceUnavailable as exc:
        unavailable(exc.service, exc.reason)


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
