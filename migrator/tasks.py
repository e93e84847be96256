"""django-q2 task entry points: one task migrates one target for one run.

The task is the only place where the record meets the engine: it takes the run through the
``tenants`` actions, reads the admin credentials from Vault, calls the runner and records the
outcome. It runs in a django-q2 worker process (or inline for ``migrate_tenants --sync``); Alembic
is process-global, so each worker process runs one migration at a time.
"""

import logging
import time

from migrator import runner
from migrator.exceptions import DatabaseAuthFailed, MigratorError
from migrator.secrets import get_secrets_manager
from migrator.targets import Target

logger = logging.getLogger("migrator.tasks")


def run_migration(run_id):
    """Execute run ``run_id``; returns a small summary for django-q2's result table.

    Returns early when the run is no longer queued (cancelled, or already taken by another
    worker). Never raises for a migration that failed: the failure is recorded on the run, and
    the task itself succeeded in doing its job. The summary never contains a secret.
    """
    from tenants import actions

    run = actions.do_start_run(run_id, worker_host=actions.worker_identity())
    if run is None:
        logger.info("Run %s is no longer queued; nothing to do", run_id)
        return {"run": run_id, "status": "not-queued"}
    started = time.monotonic()
    try:
        result = migrate(run.target, kind=run.kind, revision=run.requested_revision)
    except MigratorError as exc:
        logger.error("%s", exc)
        actions.do_record_run_failure(
            run, exc, heads=runner.heads(), duration_ms=_elapsed_ms(started)
        )
    except Exception as exc:  # noqa: BLE001 - recorded on the run, never lost
        logger.exception("Unexpected error in run %s for %s", run_id, run.target.name)
        actions.do_record_run_failure(
            run,
            _UnexpectedError(f"Unexpected error ({type(exc).__name__}): {exc}"),
            heads=runner.heads(),
            duration_ms=_elapsed_ms(started),
        )
    else:
        actions.do_record_run_success(run, result, heads=runner.heads())
    return {"run": run_id, "target": run.target.name, "status": run.status}


class _UnexpectedError(MigratorError):
    code = "internal_error"


def _elapsed_ms(started):
    return int((time.monotonic() - started) * 1000)


def migrate(record, *, kind="upgrade", revision="head"):
    """Bring the database of ``record`` (a ``MigrationTarget``) to ``revision``.

    Reads the admin credentials at ``{mount}/data/{secrets path}/{record.vault_path}`` (cached
    per process). When the database rejects them and Vault has newer ones (a rotation), reads
    Vault once more and retries once.
    """
    secrets = get_secrets_manager()
    verb = runner.downgrade if kind == "downgrade" else runner.upgrade
    connection = secrets.migration_credentials(record.vault_path, provider=record.provider)
    try:
        return verb(Target(record.name, connection), revision)
    except DatabaseAuthFailed:
        secrets.invalidate(record.vault_path)
        fresh = secrets.migration_credentials(record.vault_path, provider=record.provider)
        if fresh == connection:
            raise
        logger.info("Credentials for %s changed in Vault; retrying once", record.name)
        return verb(Target(record.name, fresh), revision)
