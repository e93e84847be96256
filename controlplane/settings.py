"""Settings for the control plane, read from the environment (twelve-factor) with django-environ.

Every setting has a safe default for local use; the README's settings table documents each one.
Values are read here and nowhere else; misconfiguration is reported by the system checks in
``controlplane.checks`` (``manage.py check``), which also run when the WSGI/ASGI app starts.
"""

import os
from datetime import timedelta
from pathlib import Path

import environ

BASE_DIR = Path(__file__).resolve().parent.parent

# Settings whose value is not of their type: {name: (value, what it must be)}. Reported by name by
# `manage.py check` (controlplane.checks), which also stops the WSGI/ASGI app; the default stands
# in meanwhile, where raising here was a traceback that named nothing.
INVALID_SETTINGS = {}


class Env(environ.Env):
    """django-environ, recording a value of the wrong type in INVALID_SETTINGS."""

    def _typed(self, var, default, reader, expected):
        try:
            return reader(var, default=default)
        except ValueError:
            INVALID_SETTINGS[var] = (self.ENVIRON.get(var, ""), expected)
            return default

    def int(self, var, default=environ.Env.NOTSET):
        return self._typed(var, default, super().int, "a whole number")

    def float(self, var, default=environ.Env.NOTSET):
        return self._typed(var, default, super().float, "a number")

    def dict(self, var, default=environ.Env.NOTSET):
        return self._typed(var, default, super().dict, "NAME=VALUE pairs separated by commas")

    def bool(self, var, default=environ.Env.NOTSET):
        value = self.ENVIRON.get(var)
        known = (*self.BOOLEAN_TRUE_STRINGS, "false", "off", "no", "n", "0", "")
        if value is not None and value.strip().lower() not in known:
            INVALID_SETTINGS[var] = (value, "true or false")
            return default
        return super().bool(var, default=default)


env = Env()
# An optional .env file for local work; real environment variables win.
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)


def private_directory(path):
    """Create ``path`` readable by this user only (0700). An existing directory is left as it is:
    it may be a volume or a folder somebody else chose the permissions of."""
    if not path.exists():
        path.mkdir(parents=True, mode=0o700)
        path.chmod(0o700)  # mkdir's mode is masked by the umask


def private_file(path):
    """Create ``path`` empty and readable by this user only (0600), or take the group's and other
    users' access away from an existing one this user owns. SQLite gives its -wal and -shm files
    the database file's permissions, and takes an empty file for a new database."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        for name in (path, f"{path}-wal", f"{path}-shm"):
            try:
                info = os.stat(name)
                if info.st_uid == os.getuid() and info.st_mode & 0o077:
                    os.chmod(name, info.st_mode & 0o700)
            except OSError:  # not there, or not ours to change
                pass
    except OSError:  # no such directory: SQLite says so when it opens the database
        pass


DATA_DIR = Path(env.str("DATA_DIR", default=str(BASE_DIR / "var")))
# DATA_DIR holds the SQLite control plane (sessions, the users' password hashes), the backups and
# the demo's databases: nobody else on the host reads it.
private_directory(DATA_DIR)

DEBUG = env.bool("DEBUG", default=False)

# Only a development default, and only with DEBUG on. Without DEBUG and without SECRET_KEY the
# value stays empty: Django refuses to use it and the check controlplane.E001 names the setting.
_DEV_SECRET_KEY = "django-insecure-dev-only-never-use-in-production"  # noqa: S105
SECRET_KEY = env.str("SECRET_KEY", default=_DEV_SECRET_KEY if DEBUG else "")

ALLOWED_HOSTS = env.list(
    "ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"] if DEBUG else []
)
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    # Swagger UI's scripts, served from STATIC_ROOT: the docs page needs no CDN.
    "drf_spectacular_sidecar",
    "knox",
    # Before django_q: its `qcluster` command is controlplane's (a graceful stop, recovery).
    "controlplane.apps.ControlPlaneConfig",
    "django_q",
    "health_check",
    "tenants",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves the admin's CSS and scripts from STATIC_ROOT under any WSGI server (gunicorn).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "controlplane.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "controlplane" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "controlplane.wsgi.application"
ASGI_APPLICATION = "controlplane.asgi.application"

# The control plane's own database (not a tenant database). SQLite by default, in WAL mode with
# immediate transactions so the web process and the django-q2 workers can share it.
DATABASES = {
    "default": env.db_url("DATABASE_URL", default=f"sqlite:///{DATA_DIR / 'controlplane.sqlite3'}"),
}
# django-q2 closes the connection before each task and each queue read unless it may live on:
# with PostgreSQL that was a new server process three times per migration run, more CPU than the
# run's own queries (bench/README.md). Checked before reuse; `?conn_max_age=0` in DATABASE_URL
# turns it off.
DATABASES["default"].setdefault("CONN_MAX_AGE", 300)
DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # How long a write waits for SQLite's lock; `?timeout=N` in DATABASE_URL sets it.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault("timeout", 30)
    DATABASES["default"]["OPTIONS"].update(
        {
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # Tests with worker processes need a file the workers can open, not an in-memory database.
    DATABASES["default"].setdefault("TEST", {})["NAME"] = str(
        DATA_DIR / "test-controlplane.sqlite3"
    )
    if DATABASES["default"]["NAME"] not in ("", ":memory:"):
        private_file(DATABASES["default"]["NAME"])

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(DATA_DIR / "static")))
# WhiteNoise serves collected files from STATIC_ROOT, and the apps' own files when nothing was
# collected (the demo, a source checkout under gunicorn).
WHITENOISE_USE_FINDERS = True
try:
    STATIC_ROOT.mkdir(parents=True, exist_ok=True)
except OSError:  # a read-only image: collectstatic ran at build time or the finders serve
    pass

LOGIN_URL = "admin:login"

# --- HashiCorp Vault (or OpenBao): Vault's own environment names -------------------------------
VAULT_ADDR = env.str("VAULT_ADDR", default="http://127.0.0.1:8200")
VAULT_TOKEN = env.str("VAULT_TOKEN", default="")
VAULT_NAMESPACE = env.str("VAULT_NAMESPACE", default="")
VAULT_CACERT = env.str("VAULT_CACERT", default="")
VAULT_AUTH_METHOD = env.str("VAULT_AUTH_METHOD", default="token").strip().lower()
VAULT_ROLE_ID = env.str("VAULT_ROLE_ID", default="")
VAULT_SECRET_ID = env.str("VAULT_SECRET_ID", default="")
VAULT_SECRET_ID_FILE = env.str("VAULT_SECRET_ID_FILE", default="")
VAULT_APPROLE_MOUNT_POINT = env.str("VAULT_APPROLE_MOUNT_POINT", default="approle")
VAULT_KUBERNETES_ROLE = env.str("VAULT_KUBERNETES_ROLE", default="")
VAULT_KUBERNETES_JWT_FILE = env.str(
    "VAULT_KUBERNETES_JWT_FILE", default="/var/run/secrets/kubernetes.io/serviceaccount/token"
)
VAULT_KUBERNETES_MOUNT_POINT = env.str("VAULT_KUBERNETES_MOUNT_POINT", default="kubernetes")
VAULT_MOUNT_POINT = env.str("VAULT_MOUNT_POINT", default="secret")
VAULT_DATABASE_SECRETS_PATH = env.str("VAULT_DATABASE_SECRETS_PATH", default="database")
# Where Vault's database secrets engine is mounted, for targets whose secret says
# admin_credentials=dynamic or static-role (README: "Dynamic credentials").
VAULT_DATABASE_MOUNT_POINT = env.str("VAULT_DATABASE_MOUNT_POINT", default="database")
VAULT_CACHE_SECONDS = env.int("VAULT_CACHE_SECONDS", default=300)
VAULT_TIMEOUT = env.int("VAULT_TIMEOUT", default=10)

# --- Migrations -------------------------------------------------------------------------------
MIGRATE_ON_STARTUP = env.bool("MIGRATE_ON_STARTUP", default=False)
MIGRATE_SHARED_ON_STARTUP = env.bool("MIGRATE_SHARED_ON_STARTUP", default=False)
DATABASE_CONNECT_TIMEOUT = env.int("DATABASE_CONNECT_TIMEOUT", default=30)
# Where the Alembic scripts live: point this at your own Alembic directory.
TENANT_MIGRATIONS_DIR = env.str(
    "TENANT_MIGRATIONS_DIR", default=str(BASE_DIR / "tenant_migrations")
)
# How long a run waits for the target-level lock held by another run before giving up.
MIGRATION_LOCK_TIMEOUT = env.int("MIGRATION_LOCK_TIMEOUT", default=60)
# PostgreSQL session limits for the migration connection, protecting live traffic.
MIGRATION_PG_LOCK_TIMEOUT = env.str("MIGRATION_PG_LOCK_TIMEOUT", default="5s")
MIGRATION_PG_STATEMENT_TIMEOUT = env.str("MIGRATION_PG_STATEMENT_TIMEOUT", default="15min")
# MySQL/MariaDB: seconds a revision's statement waits for a metadata lock (lock_wait_timeout), and
# MariaDB's max_statement_time (0: none; MySQL has no statement bound that applies to DDL).
MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT = env.int("MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT", default=5)
MIGRATION_MYSQL_STATEMENT_TIMEOUT = env.int("MIGRATION_MYSQL_STATEMENT_TIMEOUT", default=900)
# ODBC driver for SQL Server targets whose secret does not name one.
MSSQL_ODBC_DRIVER = env.str("MSSQL_ODBC_DRIVER", default="ODBC Driver 18 for SQL Server")
# A running run writes a heartbeat this often; one silent for RUN_STALE_AFTER_SECONDS is taken
# as abandoned (its worker was killed) by the recovery schedule and `migrate_tenants --recover`.
RUN_HEARTBEAT_SECONDS = env.int("RUN_HEARTBEAT_SECONDS", default=15)
RUN_STALE_AFTER_SECONDS = env.int("RUN_STALE_AFTER_SECONDS", default=120)
# A worker that cannot write a finished run's outcome to the control-plane database (down,
# restarting, locked) tries again for this long; after that, recovery records it.
RUN_RECORD_RETRY_SECONDS = env.int("RUN_RECORD_RETRY_SECONDS", default=120)
# A queued run that no worker took this long while its queue made no progress (no run of that
# cluster started or running) is closed as abandoned, and tried again while attempts remain.
RUN_QUEUED_TIMEOUT_SECONDS = env.int("RUN_QUEUED_TIMEOUT_SECONDS", default=300)
# A run that fails with a retryable error (Vault or database unreachable, target locked) is
# tried again, up to RUN_MAX_ATTEMPTS in all, waiting RUN_RETRY_BACKOFF_SECONDS, then twice
# that, and so on.
RUN_MAX_ATTEMPTS = env.int("RUN_MAX_ATTEMPTS", default=3)
RUN_RETRY_BACKOFF_SECONDS = env.int("RUN_RETRY_BACKOFF_SECONDS", default=30)
# Backups before a run applies anything: per kind of target (a target may override it).
BACKUP_DIR = env.str("BACKUP_DIR", default=str(DATA_DIR / "backups"))
BACKUP_RETENTION = env.int("BACKUP_RETENTION", default=5)
BACKUP_BEFORE_MIGRATION_SHARED = env.bool("BACKUP_BEFORE_MIGRATION_SHARED", default=False)
BACKUP_BEFORE_MIGRATION_DEDICATED = env.bool("BACKUP_BEFORE_MIGRATION_DEDICATED", default=False)
BACKUP_BEFORE_MIGRATION_EXTERNAL = env.bool("BACKUP_BEFORE_MIGRATION_EXTERNAL", default=True)
# SQL Server writes its own backups, to a path on the SQL Server host.
MSSQL_BACKUP_DIR = env.str("MSSQL_BACKUP_DIR", default="/var/opt/mssql/backup")
# Verify every target's schema against the reference for its revision after an upgrade, and
# re-check the whole fleet for drift every VERIFY_SCHEDULE_MINUTES (0: never).
VERIFY_AFTER_UPGRADE = env.bool("VERIFY_AFTER_UPGRADE", default=True)
VERIFY_SCHEDULE_MINUTES = env.int("VERIFY_SCHEDULE_MINUTES", default=1440)
# Scratch databases used to build the reference schema of a revision, one per provider
# (a server URL whose user may create and drop databases). Unset: no reference for that provider.
VERIFY_SCRATCH_POSTGRES_URL = env.str("VERIFY_SCRATCH_POSTGRES_URL", default="")
VERIFY_SCRATCH_MYSQL_URL = env.str("VERIFY_SCRATCH_MYSQL_URL", default="")
# One django-q2 cluster per region: "eu=controlplane-eu,us=controlplane-us". Start each region's
# workers with `Q_CLUSTER_NAME=controlplane-eu manage.py qcluster` (django-q2's own variable).
# With REGION_CLUSTERS empty every region goes to the default cluster; otherwise a region that is
# not listed is refused when a run is triggered, never queued where no worker reads.
REGION_CLUSTERS = env.dict("REGION_CLUSTERS", default={})
# Bearer token for /metrics (empty: no token asked).
METRICS_TOKEN = env.str("METRICS_TOKEN", default="")
# The longest one migration task may run; the queue's timeout and retry follow from it.
MIGRATION_TASK_TIMEOUT = env.int("MIGRATION_TASK_TIMEOUT", default=3600)

# Rollouts (docs/rollouts.md): at most this many migrations at a time on one database server
# (host:port from the targets' secrets; 0: no cap; a rollout may set its own), and a webhook told
# when a rollout halts, completes or is aborted (a JSON body with a Slack-compatible "text"),
# tried ROLLOUT_WEBHOOK_ATTEMPTS times with a doubling pause.
ROLLOUT_PER_SERVER_CONCURRENCY = env.int("ROLLOUT_PER_SERVER_CONCURRENCY", default=0)
ROLLOUT_WEBHOOK_URL = env.str("ROLLOUT_WEBHOOK_URL", default="")
ROLLOUT_WEBHOOK_ATTEMPTS = env.int("ROLLOUT_WEBHOOK_ATTEMPTS", default=4)
ROLLOUT_WEBHOOK_BACKOFF_SECONDS = env.float("ROLLOUT_WEBHOOK_BACKOFF_SECONDS", default=1.0)

# --- django-q2: ORM broker by default, Redis when REDIS_URL is set ---------------------------
REDIS_URL = env.str("REDIS_URL", default="")
Q_WORKERS = env.int("Q_WORKERS", default=2)
# How long the ORM broker's pusher sleeps when the queue is empty (Redis blocks instead): the
# wait before a newly queued run starts. django-q2's 0.2 s was a tenth of a 200-target fleet's
# wall time here (bench/README.md); an idle cluster reads the queue ten times a second.
Q_POLL = env.float("Q_POLL", default=0.1)
Q_CLUSTER = {
    # The site name: the same for every cluster of one control plane (it salts the signed task
    # payloads). Which queue a `qcluster` serves is django-q2's own Q_CLUSTER_NAME variable.
    "name": env.str("Q_SITE_NAME", default="controlplane"),
    # One queue per region (see REGION_CLUSTERS); django-q2 requires the key to exist.
    "ALT_CLUSTERS": {cluster: {} for cluster in REGION_CLUSTERS.values()},
    "workers": Q_WORKERS,
    "recycle": 500,
    # A task may run for MIGRATION_TASK_TIMEOUT; it is only handed out again well after that, so a
    # second attempt never starts while the first may still be running.
    "timeout": MIGRATION_TASK_TIMEOUT,
    "retry": MIGRATION_TASK_TIMEOUT + 120,
    # A failed migration is recorded on its run and retried by an operator, never blindly.
    "max_attempts": 1,
    "ack_failures": True,
    # Each run records its own outcome, so django-q2 keeps no successful task (failed ones it
    # keeps). Its pruning reads every kept success each time it saves one: at 1,000 kept that was
    # 10 ms per run in its one monitor process, a bottleneck for the cluster (bench/README.md).
    "save_limit": -1,
    "catch_up": False,
    # The pusher takes up to one task per worker from the queue in one query, not one by one.
    "bulk": Q_WORKERS,
    "poll": Q_POLL,
    "label": "Task queue",
}
if REDIS_URL:
    Q_CLUSTER["redis"] = REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"

# --- HTTP API ---------------------------------------------------------------------------------
# API tokens (django-rest-knox) are stored as SHA-512 digests, shown once when made, and expire
# after API_TOKEN_TTL_DAYS (0: never) unless made with another expiry.
API_TOKEN_TTL_DAYS = env.int("API_TOKEN_TTL_DAYS", default=90)
REST_KNOX = {
    "AUTH_HEADER_PREFIX": "Bearer",
    "TOKEN_TTL": timedelta(days=API_TOKEN_TTL_DAYS) if API_TOKEN_TTL_DAYS > 0 else None,
}
# Requests per client address without a valid token, and per user with one ("N/s", "N/min",
# "N/hour", "N/day"; empty: no bound). A failed admin login counts by address and user name;
# ADMIN_LOGIN_FAILURE_LIMIT failures within ADMIN_LOGIN_LOCKOUT_SECONDS refuse it (0: no bound).
API_THROTTLE_ANON = env.str("API_THROTTLE_ANON", default="20/min")
API_THROTTLE_USER = env.str("API_THROTTLE_USER", default="600/min")
ADMIN_LOGIN_FAILURE_LIMIT = env.int("ADMIN_LOGIN_FAILURE_LIMIT", default=5)
ADMIN_LOGIN_LOCKOUT_SECONDS = env.int("ADMIN_LOGIN_LOCKOUT_SECONDS", default=900)
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "tenants.authentication.BearerTokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "UNAUTHENTICATED_USER": None,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

# The OpenAPI schema (/api/schema/) and its docs page (/api/docs/).
SPECTACULAR_SETTINGS = {
    "TITLE": "Tenant migrations control plane",
    "DESCRIPTION": "Register tenants from the SaaS's provisioning events, list and retire "
    "tenants and targets, migrate a tenant's database and follow its run. Authenticate with "
    "`Authorization: Bearer TOKEN`.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# Error pages (DEBUG) and error reports never show a credential: controlplane/error_reports.py.
DEFAULT_EXCEPTION_REPORTER_FILTER = "controlplane.error_reports.CredentialFilter"

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {"redact_secrets": {"()": "migrator.redaction.RedactSecretsFilter"}},
    "formatters": {
        "plain": {"format": "%(asctime)s [%(levelname).3s] %(name)s: %(message)s"},
    },
    "handlers": {
        "console": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "filters": ["redact_secrets"],
        },
    },
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {
        "django": {"level": "INFO"},
        "alembic": {"level": "WARNING"},
    },
}
