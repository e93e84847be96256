"""Scratch databases: a new, empty database of a provider on its VERIFY_SCRATCH_*_URL server (a
temporary file for SQLite), where a reference schema is built, dropped afterwards."""

from __future__ import annotations

import contextlib
import logging
import secrets as random
import tempfile
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url

from migrator import engines, providers
from migrator.exceptions import MigratorError, NoScratchDatabase, VerificationError
from migrator.secrets import ConnectionInfo
from migrator.targets import Target

logger = logging.getLogger("migrator.verify")


@contextlib.contextmanager
def _driver_errors(target: Target) -> Iterator[None]:
    """Driver errors while reading a schema, as ``VerificationError`` with the driver's words."""
    try:
        yield
    except sa_exc.DBAPIError as exc:
        raise VerificationError(engines.error_reason(exc, target.connection)) from None


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
