"""The target-level migration lock: at most one migration run per target database at a time.

The lock lives on the target itself, so it holds between control planes, worker processes and a
migration author's ``alembic`` CLI (``tenant_migrations/env.py`` takes the same lock). Each
provider (``migrator.providers``) uses its own session-level lock, which the server releases by
itself when the connection dies, so a killed worker never leaves a target locked:

* PostgreSQL: ``pg_try_advisory_lock(key)``, and when another session holds it
  ``pg_advisory_lock(key)``, the wait bounded by ``lock_timeout``.
* MySQL/MariaDB: ``GET_LOCK(name, timeout)``.
* SQL Server: ``sp_getapplock`` with ``@LockOwner = 'Session'``.
* SQLite: an exclusive ``flock`` on a file next to the database.

This module needs no Django settings: the caller passes the timeout.
"""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from migrator import providers
from migrator.exceptions import TargetLocked


@contextmanager
def target_lock(
    connection: Connection,
    *,
    timeout: float,
    target_name: str,
    session_settings: Mapping[str, str] | None = None,
    released_with_connection: bool = False,
) -> Iterator[None]:
    """Hold the migration lock of the database behind ``connection`` for the ``with`` block.

    Waits up to ``timeout`` seconds for a run elsewhere to finish, then raises ``TargetLocked``.
    Leaves ``connection`` outside any transaction both on entry to the block and on exit, so
    Alembic can open one transaction per revision.

    ``session_settings`` are set for the session: PostgreSQL's (``{"lock_timeout": "5s"}``) in
    the statement that takes the lock, MySQL's (``{"lock_wait_timeout": "5"}``) with a ``SET
    SESSION`` once it is held. With ``released_with_connection`` the block's end does not
    release the lock: the caller closes the connection right after, and the server releases a
    session-level lock with its session (a statement and a transaction fewer per run; the
    migration runner's connections are never pooled). A lock file (SQLite) is always
    released at the block's end.
    """
    provider = providers.for_dialect(connection.dialect.name)
    # In autocommit where that is free (PostgreSQL): the lock and the session's settings in one
    # round trip, instead of a transaction of their own around them.
    with providers.autocommit(connection):
        if provider is None:
            # A dialect no provider speaks (an `alembic` CLI URL) runs unguarded.
            if session_settings:
                raise ValueError(f"no session settings on {connection.dialect.name}")
            release = _no_lock
        else:
            release = provider.take_lock(connection, timeout, session_settings or {})
        if release is None:
            raise TargetLocked(
                f"Target {target_name} is locked by another run (another worker, control plane "
                f"or an `alembic` command); waited {timeout:g}s. Try again once that run has "
                "finished."
            )
        connection.commit()
    if released_with_connection and provider is not None and provider.session_lock:
        release = None
    try:
        yield
    finally:
        try:
            # A failed revision may leave the connection in an aborted transaction.
            if connection.in_transaction():
                connection.rollback()
            if release is not None:
                with providers.autocommit(connection):
                    release()
                    connection.commit()
        except sa_exc.DBAPIError:
            # The connection is gone; the server released the session lock with it.
            pass


def _no_lock() -> None:
    pass


def is_held(connection: Connection) -> bool:
    """Does some session hold the migration lock of the database behind ``connection`` now?

    Asked without taking the lock, so a run starting at that moment is never kept out:
    PostgreSQL's ``pg_locks`` (the advisory lock's row in this database), MySQL/MariaDB's
    ``IS_USED_LOCK``, SQL Server's ``APPLOCK_TEST``, SQLite's lock file (a non-blocking
    ``flock``, let go at once). Recovery asks this before it declares a silent run dead: a
    session that still holds the lock belongs to a run that is alive, or to another migration of
    that database.
    """
    provider = providers.for_dialect(connection.dialect.name)
    if provider is None:
        return False
    with providers.autocommit(connection):
        return provider.lock_held(connection)
