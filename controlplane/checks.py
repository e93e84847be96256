"""System checks for the control plane's settings.

They run with every management command (``manage.py check`` shows them) and when the WSGI/ASGI
application starts, so misconfiguration stops the process at start-up, naming the setting,
instead of failing at the first request or the first migration.
"""

import os
import re

from django.conf import settings
from django.core import checks
from django.core.exceptions import ImproperlyConfigured

VAULT_AUTH_METHODS = ("token", "approle", "kubernetes")


@checks.register("controlplane")
def check_settings(app_configs=None, **kwargs):
    errors = []
    try:
        settings.SECRET_KEY  # noqa: B018 - Django raises when it is empty
    except ImproperlyConfigured:
        errors.append(
            checks.Error(
                "SECRET_KEY is not set.",
                hint="Set the SECRET_KEY environment variable to a long random value "
                "(python -c 'import secrets; print(secrets.token_urlsafe(50))'), "
                "or set DEBUG=true to use the development default.",
                id="controlplane.E001",
            )
        )
    method = settings.VAULT_AUTH_METHOD
    if method not in VAULT_AUTH_METHODS:
        errors.append(
            checks.Error(
                f"VAULT_AUTH_METHOD is {method!r}; it must be one of: "
                f"{', '.join(VAULT_AUTH_METHODS)}.",
                id="controlplane.E002",
            )
        )
    elif method == "approle":
        if not settings.VAULT_ROLE_ID:
            errors.append(
                checks.Error(
                    "VAULT_AUTH_METHOD is 'approle' but VAULT_ROLE_ID is not set.",
                    id="controlplane.E003",
                )
            )
        if not (settings.VAULT_SECRET_ID or settings.VAULT_SECRET_ID_FILE):
            errors.append(
                checks.Error(
                    "VAULT_AUTH_METHOD is 'approle' but neither VAULT_SECRET_ID nor "
                    "VAULT_SECRET_ID_FILE is set.",
                    id="controlplane.E004",
                )
            )
        elif settings.VAULT_SECRET_ID_FILE and not os.path.isfile(settings.VAULT_SECRET_ID_FILE):
            errors.append(
                checks.Error(
                    f"VAULT_SECRET_ID_FILE points to {settings.VAULT_SECRET_ID_FILE!r}, "
                    "which is not a file.",
                    id="controlplane.E005",
                )
            )
    elif method == "kubernetes" and not settings.VAULT_KUBERNETES_ROLE:
        errors.append(
            checks.Error(
                "VAULT_AUTH_METHOD is 'kubernetes' but VAULT_KUBERNETES_ROLE is not set.",
                id="controlplane.E006",
            )
        )
    elif method == "token" and not settings.VAULT_TOKEN:
        errors.append(
            checks.Warning(
                "VAULT_AUTH_METHOD is 'token' but VAULT_TOKEN is not set: no migration can "
                "read its credentials until it is.",
                id="controlplane.W001",
            )
        )
    if not settings.VAULT_ADDR.startswith(("http://", "https://")):
        errors.append(
            checks.Error(
                f"VAULT_ADDR is {settings.VAULT_ADDR!r}; it must be an http:// or https:// URL.",
                id="controlplane.E007",
            )
        )
    if settings.VAULT_CACERT and not os.path.exists(settings.VAULT_CACERT):
        errors.append(
            checks.Error(
                f"VAULT_CACERT points to {settings.VAULT_CACERT!r}, which does not exist.",
                id="controlplane.E008",
            )
        )
    for name in ("VAULT_CACHE_SECONDS",):
        if getattr(settings, name) < 0:
            errors.append(checks.Error(f"{name} must be 0 or more.", id="controlplane.E009"))
    for name in ("DATABASE_CONNECT_TIMEOUT", "MIGRATION_TASK_TIMEOUT", "VAULT_TIMEOUT"):
        if getattr(settings, name) <= 0:
            errors.append(checks.Error(f"{name} must be more than 0.", id="controlplane.E010"))
    errors += _check_run_liveness()
    errors += _check_values_of_the_wrong_type()
    errors += _check_postgres_durations()
    errors += _check_mysql_bounds()
    errors += _check_rollouts()
    errors += _check_workers_and_bounds()
    errors += _check_alembic_version()
    if not os.path.isfile(os.path.join(settings.TENANT_MIGRATIONS_DIR, "env.py")):
        errors.append(
            checks.Error(
                f"TENANT_MIGRATIONS_DIR is {settings.TENANT_MIGRATIONS_DIR!r}, which is not an "
                "Alembic script directory (no env.py in it).",
                id="controlplane.E011",
            )
        )
    else:
        from migrator.runner import check_env_py

        problem = check_env_py()
        if problem:
            # Every run would fail saying so; the rest of the control plane still works.
            errors.append(checks.Warning(problem, id="controlplane.W011"))
        problem = _check_revisions_import()
        if problem:
            errors.append(checks.Warning(problem, id="controlplane.W012"))
    return errors


def _check_revisions_import():
    """Every revision file imports in this process ("" when it does): a warning, not an error,
    so that a web process still starts and shows the record while a bad deploy is fixed."""
    from migrator import runner
    from migrator.exceptions import ScriptDirectoryUnreadable

    try:
        runner.script_directory()
    except ScriptDirectoryUnreadable as exc:
        return str(exc)
    return ""


def _check_alembic_version():
    """The installed Alembic is one the control plane was tested on: it relies on parts of
    Alembic that Alembic does not promise to keep (migrator/alembic_internals.py). A warning:
    the record, the pages and the API still work, and a run that meets a changed Alembic fails
    on its own record."""
    from migrator import alembic_internals

    problem = alembic_internals.version_problem()
    if not problem:
        return []
    return [checks.Warning(problem, id="controlplane.W013")]


def _check_run_liveness():
    """The heartbeat, the window after which a silent run is taken for dead, and the bound on a
    queued run that no worker takes."""
    errors = []
    beat, stale = settings.RUN_HEARTBEAT_SECONDS, settings.RUN_STALE_AFTER_SECONDS
    if beat <= 0:
        errors.append(
            checks.Error("RUN_HEARTBEAT_SECONDS must be more than 0.", id="controlplane.E030")
        )
    elif stale <= beat:
        errors.append(
            checks.Error(
                f"RUN_STALE_AFTER_SECONDS ({stale}) must be more than RUN_HEARTBEAT_SECONDS "
                f"({beat}): a run is taken for dead after this long without a heartbeat, so a "
                "live run would be closed between two beats.",
                hint="Leave room for several missed beats under load, e.g. the defaults 120 and "
                "15.",
                id="controlplane.E031",
            )
        )
    if settings.RUN_QUEUED_TIMEOUT_SECONDS <= 0:
        errors.append(
            checks.Error("RUN_QUEUED_TIMEOUT_SECONDS must be more than 0.", id="controlplane.E032")
        )
    return errors


def _check_values_of_the_wrong_type():
    """Settings whose value is not a number, a boolean, ... (controlplane.settings.Env)."""
    return [
        checks.Error(
            f"{name} is {value!r}; it must be {expected}.",
            hint=f"Correct {name}, or unset it to use the default.",
            id="controlplane.E040",
        )
        for name, (value, expected) in settings.INVALID_SETTINGS.items()
    ]


# PostgreSQL's syntax for a duration setting (guc.c, parse_int): a number, optionally with a
# fraction, an exponent or in hex, then optionally a unit (case-sensitive; milliseconds if none).
PG_DURATION = re.compile(
    r"\s*(?P<number>[+-]?(?:0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?))"
    r"\s*(?P<unit>us|ms|s|min|h|d)?\s*"
)
PG_DURATION_UNITS_MS = {
    "us": 0.001,
    "ms": 1,
    "s": 1000,
    "min": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
}
PG_INT_MAX = 2**31 - 1


def postgres_duration_ms(text):
    """The milliseconds PostgreSQL reads in ``text`` for ``lock_timeout`` or
    ``statement_timeout``, or None where it would refuse it (not its syntax, out of range)."""
    match = PG_DURATION.fullmatch(text)
    if not match:
        return None
    number = match["number"]
    digits = number.lstrip("+-")
    try:
        if digits[:2] in ("0x", "0X"):
            value = int(number, 16)
        elif digits[:1] == "0" and digits.isdigit():
            value = int(number, 8)  # C's strtol: a leading 0 is octal, so 08 is refused
        else:
            value = float(number)
    except ValueError:
        return None
    milliseconds = round(value * PG_DURATION_UNITS_MS[match["unit"] or "ms"])
    return milliseconds if 0 <= milliseconds <= PG_INT_MAX else None


def _check_postgres_durations():
    """MIGRATION_PG_*_TIMEOUT are handed to PostgreSQL as they are: a value it refuses failed
    every PostgreSQL run."""
    errors = []
    for name in ("MIGRATION_PG_LOCK_TIMEOUT", "MIGRATION_PG_STATEMENT_TIMEOUT"):
        value = str(getattr(settings, name))
        if postgres_duration_ms(value) is None:
            errors.append(
                checks.Error(
                    f"{name} is {value!r}, which PostgreSQL does not read as a duration.",
                    hint="A number and a unit: us, ms, s, min, h or d (e.g. 5s, 500ms, 15min; "
                    "0 turns the bound off), at most about 24 days.",
                    id="controlplane.E041",
                )
            )
    return errors


def _check_mysql_bounds():
    """MIGRATION_MYSQL_*: MySQL's lock_wait_timeout is 1 second or more; max_statement_time 0
    (none) or more."""
    errors = []
    if settings.MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT < 1:
        errors.append(
            checks.Error(
                f"MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT is {settings.MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT}"
                "; it is MySQL's lock_wait_timeout, in seconds: 1 or more.",
                id="controlplane.E046",
            )
        )
    if settings.MIGRATION_MYSQL_STATEMENT_TIMEOUT < 0:
        errors.append(
            checks.Error(
                "MIGRATION_MYSQL_STATEMENT_TIMEOUT must be 0 (no bound) or more seconds.",
                id="controlplane.E046",
            )
        )
    return errors


def _check_rollouts():
    """ROLLOUT_*: a cap of 0 (none) or more, a webhook URL that is http(s), 1 attempt or more."""
    from urllib.parse import urlsplit

    errors = []
    if settings.ROLLOUT_PER_SERVER_CONCURRENCY < 0:
        errors.append(
            checks.Error(
                "ROLLOUT_PER_SERVER_CONCURRENCY must be 0 (no cap) or more.",
                id="controlplane.E061",
            )
        )
    url = settings.ROLLOUT_WEBHOOK_URL
    if url and (urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname):
        errors.append(
            checks.Error(
                "ROLLOUT_WEBHOOK_URL must be an http:// or https:// URL (e.g. a Slack incoming "
                "webhook), or empty for no notifications.",
                id="controlplane.E061",
            )
        )
    if settings.ROLLOUT_WEBHOOK_ATTEMPTS < 1 or settings.ROLLOUT_WEBHOOK_BACKOFF_SECONDS < 0:
        errors.append(
            checks.Error(
                "ROLLOUT_WEBHOOK_ATTEMPTS must be 1 or more, ROLLOUT_WEBHOOK_BACKOFF_SECONDS 0 "
                "or more.",
                id="controlplane.E061",
            )
        )
    return errors


RATE = re.compile(r"\d+/(s|sec|second|m|min|minute|h|hour|d|day)")


def _check_workers_and_bounds():
    """Workers per cluster, the broker's poll, the API's rates, token and login bounds."""
    errors = []
    if settings.Q_WORKERS < 1:
        errors.append(
            checks.Error(
                f"Q_WORKERS is {settings.Q_WORKERS}; a qcluster needs 1 worker or more.",
                id="controlplane.E042",
            )
        )
    if settings.Q_POLL <= 0:
        errors.append(checks.Error("Q_POLL must be more than 0.", id="controlplane.E043"))
    for name in ("API_THROTTLE_ANON", "API_THROTTLE_USER"):
        value = getattr(settings, name)
        if value and not RATE.fullmatch(value):
            errors.append(
                checks.Error(
                    f"{name} is {value!r}; it must be a rate such as 20/min (N/s, N/min, N/hour, "
                    "N/day), or empty for no bound.",
                    id="controlplane.E044",
                )
            )
    for name in ("API_TOKEN_TTL_DAYS", "ADMIN_LOGIN_FAILURE_LIMIT"):
        if getattr(settings, name) < 0:
            errors.append(
                checks.Error(f"{name} must be 0 (no bound) or more.", id="controlplane.E045")
            )
    if settings.ADMIN_LOGIN_LOCKOUT_SECONDS <= 0:
        errors.append(
            checks.Error("ADMIN_LOGIN_LOCKOUT_SECONDS must be more than 0.", id="controlplane.E045")
        )
    return errors


def raise_on_misconfiguration():
    """Run the control plane's checks and raise ImproperlyConfigured if any is an error.

    Called by the WSGI/ASGI entry points: application servers do not run system checks.
    """
    problems = [
        message
        for message in checks.run_checks(tags=["controlplane"])
        if message.level >= checks.ERROR
    ]
    if problems:
        raise ImproperlyConfigured(
            "The control plane is misconfigured:\n" + "\n".join(str(p) for p in problems)
        )
