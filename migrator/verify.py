"""Schema verification: is a target's schema the one its revision should give, and may its app
user do what the application needs (and no more)?

After every upgrade that applied something (``migrator.pipeline``), and for the whole fleet on
a schedule (``migrator.tasks.check_fleet_for_drift``, every VERIFY_SCHEDULE_MINUTES) or on
demand (``migrate_tenants --verify``):

1. the target's schema is reflected (``migrator.schema``) through its admin connection;
2. it is compared with the **reference** for its revision and provider: the schema a scratch
   database of the same provider has after an upgrade to that revision. The scratch database is
   created on VERIFY_SCRATCH_POSTGRES_URL or VERIFY_SCRATCH_MYSQL_URL (a temporary file for
   SQLite), migrated, reflected and dropped; the reference is then kept in this process and in
   ``DATA_DIR/schema-references/<provider>/<revision>-<hash>.json`` for every worker sharing
   DATA_DIR. The hash covers the revision files the reference was built from (and ``env.py``),
   so an edited revision gets a new reference. Without a scratch server for the provider the
   schema is "not verified", never failed;
3. the server is asked for the app user's privileges (PostgreSQL, MySQL/MariaDB): SELECT,
   INSERT, UPDATE, DELETE on every table (PostgreSQL: USAGE on the schema and on serial
   sequences too), and no DDL rights (PostgreSQL: CREATE on the database or the schema, owning
   a table, superuser; MySQL: CREATE, ALTER, DROP, INDEX). The fleet check logs in as the app
   user with its own credentials from Vault, which proves them too; after an upgrade on
   PostgreSQL the same questions are asked on the run's admin connection about the app role
   (no second login per run). Only privilege queries: nothing is written.

After a target's first, a PostgreSQL schema already seen by the process costs one catalog query
(``schema.reflect``'s digest); the whole check after an upgrade runs on the run's connection.

The outcome is a ``Verification``, a value: the bridge (``migrator.tasks``) records it on the
target (``schema_fingerprint``, ``drifted``, ``drift_report``, ``verified_at``) and on the run.
Verification never fails a run: the migration itself worked, and whatever goes wrong here is
reported as "not verified" with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import secrets as random
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.utils import timezone
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from migrator import engines, process, providers, runner, schema
from migrator.exceptions import MigratorError, NoScratchDatabase, VerificationError
from migrator.redaction import redact
from migrator.secrets import ConnectionInfo, get_secrets_manager
from migrator.targets import Target

logger = logging.getLogger("migrator.verify")

FINGERPRINT_SHOWN = 12


# --- What a verification found ----------------------------------------------------------------


@dataclass
class GrantCheck:
    """The app user's privileges on the tables of one database, as the server reports them.

    ``missing`` maps an object ("projects", "sequence accounts_id_seq", "schema public") to
    the privileges the app user lacks on it; ``excess`` lists DDL rights it should not have
    ("CREATE on schema public"). ``not_checked`` says why nothing was checked, when so.
    """

    username: str
    missing: dict[str, list[str]] = field(default_factory=dict)
    excess: list[str] = field(default_factory=list)
    not_checked: str = ""

    @property
    def problems(self) -> list[str]:
        lines = [
            f"app user {self.username} lacks {', '.join(privileges)} on {name}"
            for name, privileges in self.missing.items()
        ]
        if self.excess:
            lines.append(f"app user {self.username} may run DDL: {'; '.join(self.excess)}")
        return lines

    @property
    def ok(self) -> bool:
        return not self.not_checked and not self.problems


@dataclass
class Verification:
    """What verifying one target found. ``not_verified`` says why the schema was not compared
    (then ``drifted`` is False: unknown is not wrong)."""

    target: str
    provider: str
    revision: str | None
    fingerprint: str = ""
    reference_fingerprint: str = ""
    differences: list[str] = field(default_factory=list)
    not_verified: str = ""
    grants: GrantCheck | None = None
    duration_ms: int = 0

    @property
    def verified(self) -> bool:
        return not self.not_verified

    @property
    def drifted(self) -> bool:
        return self.verified and bool(self.differences)

    @property
    def grant_problems(self) -> list[str]:
        return self.grants.problems if self.grants is not None else []

    @property
    def outcome(self) -> str:
        """One word for tables and metrics: matches, drifted or not-verified."""
        if not self.verified:
            return "not-verified"
        return "drifted" if self.drifted else "matches"

    def report(self) -> str:
        """The drift report shown on the run and on the target: the schema, then the app user."""
        at = f"{self.revision or 'base'} ({self.provider})"
        if not self.verified:
            lines = [f"Schema at {at}: not verified: {self.not_verified}"]
        elif self.drifted:
            count = len(self.differences)
            lines = [
                f"Schema at {at}: DRIFTED from the reference, {count} "
                f"difference{'s' if count != 1 else ''}:"
            ]
            lines += [f"  - {line}" for line in self.differences]
            lines.append(
                f"  fingerprint {self.fingerprint[:FINGERPRINT_SHOWN]}, reference "
                f"{self.reference_fingerprint[:FINGERPRINT_SHOWN]}"
            )
        else:
            lines = [
                f"Schema at {at}: matches the reference "
                f"(fingerprint {self.fingerprint[:FINGERPRINT_SHOWN]})."
            ]
        if self.grants is not None:
            lines.append("")
            lines.append(self._grant_section())
        return redact("\n".join(lines))

    def _grant_section(self) -> str:
        grants = self.grants
        if grants.not_checked:
            return f"App user: not checked: {grants.not_checked}"
        if not grants.problems:
            return (
                f"App user {grants.username}: may SELECT, INSERT, UPDATE and DELETE on every "
                "table, and may not run DDL."
            )
        return "\n".join(
            [f"App user {grants.username}: {len(grants.problems)} problem(s):"]
            + [f"  - {line}" for line in grants.problems]
        )

    def log_lines(self) -> list[str]:
        """Lines for the run's log."""
        if not self.verified:
            lines = [f"Schema of {self.target} not verified: {self.not_verified}"]
        elif self.drifted:
            lines = [
                f"Schema of {self.target} DRIFTED from the reference for "
                f"{self.revision or 'base'} ({self.provider}): " + "; ".join(self.differences)
            ]
        else:
            lines = [
                f"Schema of {self.target} matches the reference for {self.revision or 'base'} "
                f"({self.provider}), fingerprint {self.fingerprint[:FINGERPRINT_SHOWN]}"
            ]
        if self.grants is not None:
            if self.grants.not_checked:
                lines.append(f"App user grants not checked: {self.grants.not_checked}")
            elif self.grants.problems:
                lines += [f"Grants: {line}" for line in self.grants.problems]
            else:
                lines.append(f"Grants of app user {self.grants.username}: as expected")
        return [redact(line) for line in lines]


# --- After an upgrade -------------------------------------------------------------------------


def verify_after_upgrade(
    target: Target, revision: str | None, *, vault_path: str, provider: str, connection=None
) -> Verification:
    """Verify ``target`` after an upgrade to ``revision`` that applied revisions; returns the
    ``Verification``, which the pipeline puts on the run's result (``RunResult.verification``).

    Called by ``migrator.pipeline`` inside the run, on the run's own admin ``connection`` when
    given (else it opens one). The app user's credentials are read at ``vault_path`` (cached).
    Never raises: the run succeeded whatever is found here.
    """
    try:
        return verify_target(
            target,
            revision=revision,
            app=app_credentials(vault_path, provider),
            connection=connection,
        )
    except Exception as exc:  # noqa: BLE001 - verification must never fail the run
        logger.exception("Verifying %s failed", target.name)
        return Verification(
            target.name,
            target.provider,
            revision,
            not_verified=f"unexpected error ({type(exc).__name__}): {redact(str(exc))}",
        )


def app_credentials(vault_path: str, provider: str) -> ConnectionInfo | str:
    """The app user's connection from the secret at ``vault_path``
    (``SecretsManager.application_credentials``, cached), or why there is none to check ("" when
    ``provider`` has no grants to check)."""
    known = providers.find(provider)
    if known is None or known.app_grants is None:
        return ""
    try:
        return get_secrets_manager().application_credentials(vault_path, provider=provider)
    except MigratorError as exc:
        return f"the app credentials could not be read: {exc}"


# --- One target -------------------------------------------------------------------------------


def verify_target(
    target: Target,
    *,
    revision: str | None,
    app: ConnectionInfo | str | None = None,
    script_location=None,
    connection=None,
) -> Verification:
    """Compare ``target``'s schema (read as admin) with the reference for ``revision``, and
    check the app user's grants when ``app`` is its ``ConnectionInfo`` (a string: why it cannot
    be checked; empty or None: not applicable). Reads the schema on ``connection`` (an open
    admin connection to ``target``, left open) when given, else on a connection of its own.

    Raises nothing for what goes wrong on the way: it is in ``not_verified`` or the grant check.
    """
    started = time.monotonic()
    verification = Verification(target.name, target.provider, revision)
    try:
        with _driver_errors(target), _admin_connection(target, connection) as admin:
            actual = schema.reflect(admin, shared=shared_reflections)
            namespace = admin.dialect.default_schema_name
            if not _grants_asked_as_admin(app, connection):
                admin.rollback()  # else the grant check below shares the transaction, ends it
    except MigratorError as exc:
        verification.not_verified = f"the schema could not be read: {exc}"
        verification.duration_ms = runner.elapsed_ms(started)
        return verification
    verification.fingerprint = schema.fingerprint(actual)
    try:
        reference = reference_for(target.provider, revision, script_location=script_location)
    except NoScratchDatabase as exc:
        verification.not_verified = str(exc)
    except MigratorError as exc:
        verification.not_verified = f"the reference for {revision} could not be built: {exc}"
    else:
        verification.reference_fingerprint = reference.fingerprint
        if verification.fingerprint != reference.fingerprint:  # the same form: nothing differs
            verification.differences = schema.compare(reference.schema, actual)
    if isinstance(app, ConnectionInfo):
        verification.grants = check_app_grants(
            app, tables=schema.tables(actual), namespace=namespace, admin=connection
        )
    elif app:
        verification.grants = GrantCheck(username="?", not_checked=app)
    verification.duration_ms = runner.elapsed_ms(started)
    return verification


def _grants_asked_as_admin(app, connection) -> bool:
    """Are the app user's grants asked on the admin ``connection`` (PostgreSQL), not by logging
    in? ``check_app_grants`` decides with it, and ``verify_target`` leaves its transaction open
    for it."""
    return (
        isinstance(app, ConnectionInfo)
        and connection is not None
        and providers.get(app.provider).grants_asked_as_admin
    )


@contextlib.contextmanager
def _admin_connection(target: Target, connection=None) -> Iterator:
    if connection is not None:
        yield connection
        return
    with engines.connect(target) as opened:
        yield opened


@contextlib.contextmanager
def _driver_errors(target: Target) -> Iterator[None]:
    """Driver errors while reading a schema, as ``VerificationError`` with the driver's words."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        raise VerificationError(engines.error_reason(exc, target.connection)) from None


# --- References -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """The schema an upgrade to ``revision`` gives on a fresh database of ``provider``."""

    provider: str
    revision: str | None
    script_hash: str
    schema: dict
    fingerprint: str


_references: dict[tuple[str, str, str], Reference] = {}
_lineage_hashes: dict[tuple[str, str], str] = {}
_references_lock = threading.Lock()
# How many references this process built, by (provider, revision): each should be built once.
reference_builds: Counter = Counter()


def _forget_references() -> None:
    """Forget the references and hashes kept in this process (``process.reset()``)."""
    with _references_lock:
        _references.clear()
        _lineage_hashes.clear()
        reference_builds.clear()


def _fresh_references_lock() -> None:
    # In a forked child: a thread of the parent may have held it. The references stay.
    global _references_lock
    _references_lock = threading.Lock()


process.register("verify.references", reset=_forget_references, after_fork=_fresh_references_lock)


def reference_for(provider: str, revision: str | None, *, script_location=None) -> Reference:
    """The reference schema for ``revision`` on ``provider``: from this process, else from the
    file cache under DATA_DIR/schema-references, else built on a scratch database (once: a
    lock file makes other workers wait for the first one's result).

    Raises ``NoScratchDatabase`` when it must be built and no scratch server is configured,
    ``VerificationError`` (or another ``MigratorError``) when building fails.
    """
    if not revision:
        empty = schema.empty()
        return Reference(provider, None, "", empty, schema.fingerprint(empty))
    script = runner.script_directory(script_location)
    digest = lineage_hash(script, revision)
    key = (provider, revision, digest)
    with _references_lock:
        cached = _references.get(key)
        if cached is not None:
            return cached
        path = _reference_path(provider, revision, digest)
        data = _read_reference(path)
        if data is None:
            _scratch_setting(provider)  # fail early, before taking any lock
            with _file_lock(path.parent / ".build.lock"):  # one build at a time per provider
                data = _read_reference(path)  # another worker may have built it meanwhile
                if data is None:
                    built = build_reference(provider, revision, script_location=script.dir)
                    data = {
                        "provider": provider,
                        "revision": revision,
                        "script_hash": digest,
                        "built_at": timezone.now().isoformat(),
                        "fingerprint": schema.fingerprint(built),
                        "schema": built,
                    }
                    _write_reference(path, data)
        reference = Reference(provider, revision, digest, data["schema"], data["fingerprint"])
        _references[key] = reference
        return reference


def build_reference(provider: str, revision: str, *, script_location=None) -> dict:
    """Migrate a throw-away database of ``provider`` to ``revision`` and return its normalised
    schema. The scratch database is dropped afterwards, whatever happens."""
    logger.info("Building the reference schema of %s for %s", revision, provider)
    reference_builds[(provider, revision)] += 1
    with scratch_target(provider) as target:
        for head in revision.split(","):
            runner.upgrade(target, head, script_location=script_location)
        with _driver_errors(target), engines.connect(target) as connection:
            return schema.reflect(connection)


def lineage_hash(script, revision: str) -> str:
    """sha256 of the files of ``revision`` and every revision below it, and of ``env.py``: what
    a reference depends on. Raises ``VerificationError`` for a revision the script directory
    does not have."""
    key = (script.dir, revision)
    cached = _lineage_hashes.get(key)
    if cached is not None:
        return cached
    found = {}
    try:
        for head in revision.split(","):
            for step in script.iterate_revisions(head, "base"):
                found[step.revision] = step.path
    except Exception as exc:  # noqa: BLE001 - Alembic raises several kinds for an unknown id
        raise VerificationError(
            f"revision {revision} is not in the script directory ({script.dir}): {exc}"
        ) from None
    hasher = hashlib.sha256()
    for revision_id, path in sorted(found.items()):
        hasher.update(revision_id.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    env_py = Path(script.env_py_location)
    if env_py.exists():
        hasher.update(env_py.read_bytes())
    digest = _lineage_hashes[key] = hasher.hexdigest()
    return digest


class _SharedReflections:
    """Normalised schemas by catalog digest (``schema.reflect``), one file each under
    ``DATA_DIR/reflected-schemas``, for the processes sharing DATA_DIR: each qcluster worker
    used to run the inspector's queries on its first target (tens of milliseconds of CPU), and
    again after every recycle. A digest names its schema whatever the database, so a file is
    never stale; an unreadable one is read again from the database."""

    def path(self, digest: str) -> Path:
        return Path(settings.DATA_DIR) / "reflected-schemas" / f"{digest}.json"

    def get(self, digest: str) -> str | None:
        try:
            text = self.path(digest).read_text()
            json.loads(text)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            logger.warning("Ignoring the unreadable schema file %s", self.path(digest))
            return None
        return text

    def put(self, digest: str, text: str) -> None:
        _write_text(self.path(digest), text)


shared_reflections = _SharedReflections()


def _reference_path(provider: str, revision: str, digest: str) -> Path:
    name = revision.replace(",", "+").replace("/", "_")
    return Path(settings.DATA_DIR) / "schema-references" / provider / f"{name}-{digest[:16]}.json"


def _read_reference(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        logger.warning("Ignoring the unreadable reference file %s", path)
        return None
    if not isinstance(data, dict) or "schema" not in data or "fingerprint" not in data:
        return None
    return data


def _write_reference(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=1, sort_keys=True))


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{random.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text)
        partial.replace(path)  # atomic: a reader sees the whole file or none
    except OSError as exc:
        # What it holds still serves this process; other workers will make their own.
        logger.warning("Cannot write %s: %s", path, exc)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes sharing DATA_DIR (flock; none where there is
    no fcntl, and then two workers may both build a reference, which is harmless)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")  # closed by the with-block below
    except (ImportError, OSError):  # not POSIX, or DATA_DIR is read-only: build without a lock
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- Scratch databases ------------------------------------------------------------------------


def _scratch_setting(provider: str) -> str:
    """The scratch server URL for ``provider`` ("" for SQLite, which needs none)."""
    if providers.get(provider).file_based:
        return ""
    name = providers.get(provider).scratch_setting
    if name is None:
        raise NoScratchDatabase(
            f"no scratch database for {provider} (references are built on PostgreSQL, MySQL "
            "and SQLite only)"
        )
    url = getattr(settings, name, "")
    if not url:
        raise NoScratchDatabase(f"no scratch database for {provider} (set {name})")
    return url


@contextlib.contextmanager
def scratch_target(provider: str) -> Iterator[Target]:
    """A new, empty database of ``provider`` as a ``Target``, dropped on exit: on the scratch
    server (``CREATE DATABASE verify_ref_...``) or, for SQLite, in a temporary directory."""
    url = _scratch_setting(provider)
    kind = providers.get(provider)
    if kind.file_based:
        with tempfile.TemporaryDirectory(prefix="schema-reference-") as directory:
            info = ConnectionInfo(provider=kind.name, database=str(Path(directory) / "ref.db"))
            yield Target(f"reference-{provider}", info)
        return
    setting = kind.scratch_setting
    parsed = make_url(url)
    name = f"verify_ref_{random.token_hex(6)}"

    def info(database: str) -> ConnectionInfo:
        return ConnectionInfo(
            provider=provider,
            host=parsed.host or "127.0.0.1",
            port=parsed.port,
            database=database,
            username=parsed.username,
            password=parsed.password,
            options=dict(parsed.query),
            vault_path=setting,
        )

    server = Target(f"scratch server of {provider} ({setting})", info(parsed.database or ""))
    _server_statement(server, f"CREATE DATABASE {kind.quote(name)}")
    try:
        yield Target(f"reference-{provider}", info(name))
    finally:
        try:
            _server_statement(server, kind.drop_database(name))
        except MigratorError:
            logger.warning("Could not drop the scratch database %s on %s", name, setting)


def _server_statement(server: Target, statement: str) -> None:
    """Run one statement outside any transaction on the scratch server."""
    try:
        with _driver_errors(server), engines.connect(server) as connection:
            connection.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql(statement)
    except MigratorError as exc:
        raise VerificationError(f"{statement} on the {server.name} failed: {exc}") from None


# --- The app user's grants --------------------------------------------------------------------


def check_app_grants(
    app: ConnectionInfo, *, tables: list[str], namespace: str | None, admin=None
) -> GrantCheck:
    """Ask the server what the app user may do on ``tables`` (in schema ``namespace`` on
    PostgreSQL). Privilege queries only: nothing is written or created.

    By default it logs in as the app user, which also proves its credentials in Vault work. On
    PostgreSQL, given ``admin`` (an open admin connection to the same database), it asks there
    about the app role instead (``has_table_privilege(role, ...)``): the same answers without a
    second login, which is what the check after each upgrade does; the scheduled and on-demand
    verification log in. MySQL only tells a user its own grants, so there it always logs in.
    """
    check = GrantCheck(username=app.username or "?")
    provider = providers.get(app.provider)
    if _grants_asked_as_admin(app, admin):
        try:
            exists = provider.app_grants(
                admin, check, tables, namespace=namespace, database=app.database, role=app.username
            )
            admin.rollback()
        except sa_exc.DBAPIError as exc:
            check.not_checked = f"the privilege queries failed: {engines.error_reason(exc, app)}"
        else:
            if not exists:
                check.not_checked = (
                    f"app user {app.username} does not exist on the server: create it, or fix "
                    f"app_username in the Vault secret at {app.vault_path}"
                )
        return check
    login = app
    if provider.grants_login_database:
        login = dataclasses.replace(app, database=provider.grants_login_database)
    logged_in = False
    try:
        with engines.connect_as(login) as connection:
            logged_in = True
            provider.app_grants(
                connection, check, tables, namespace=namespace, database=app.database
            )
            connection.rollback()
    except sa_exc.DBAPIError as exc:
        if logged_in:
            check.not_checked = f"the privilege queries failed: {engines.error_reason(exc, app)}"
        elif getattr(exc.orig, "sqlstate", None) == "42501":  # PostgreSQL: no CONNECT
            check.missing[f"database {app.database}"] = ["CONNECT"]
        else:
            check.not_checked = (
                f"cannot log in as app user {app.username} "
                f"({engines.error_reason(exc, app)}): check app_username and app_password in "
                f"the Vault secret at {app.vault_path}"
            )
    return check
