"""Verifying one target: its schema against the reference for its revision, and its app user's
grants; after an upgrade, on the run's own connection (``verify_after_upgrade``, called by
``migrator.pipeline``), never failing the run."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

from migrator import engines, providers, runner, schema
from migrator.exceptions import MigratorError, NoScratchDatabase
from migrator.redaction import redact
from migrator.secrets import ConnectionInfo, get_secrets_manager
from migrator.targets import Target
from migrator.verify.grants import _grants_asked_as_admin, check_app_grants
from migrator.verify.references import reference_for, shared_reflections
from migrator.verify.report import GrantCheck, Verification
from migrator.verify.scratch import _driver_errors

logger = logging.getLogger("migrator.verify")


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
    Catalog reads only: in autocommit where that is free (``providers.autocommit``), each
    without a BEGIN and a ROLLBACK around it.
    """
    with _autocommit(connection):
        return _verify_target(target, revision, app, script_location, connection)


def _verify_target(target, revision, app, script_location, connection) -> Verification:
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


@contextlib.contextmanager
def _admin_connection(target: Target, connection=None) -> Iterator:
    if connection is not None:
        yield connection
        return
    with engines.connect(target) as opened, providers.autocommit(opened):
        yield opened


def _autocommit(connection):
    return providers.autocommit(connection) if connection is not None else contextlib.nullcontext()
