"""Restoring a target from a run's backup: the restore run, started at once; its record."""

import logging

from django.db import transaction

from tenants.actions.dispatch import Dispatch, create_or_find_active_run
from tenants.actions.lifecycle import do_start_run
from tenants.actions.outcomes import record_success
from tenants.models import RunKind, RunStatus

logger = logging.getLogger(__name__)


def do_start_restore_run(target, *, backup_run, worker_host, trigger=None, acting_user=None):
    """Create a restore run of ``backup_run``'s backup on ``target`` and start it at once.

    The run is created queued and moved to running like any run, so the database's
    ``one_active_run_per_target`` constraint guards it: when the target already has a queued or
    running run, nothing is created and the ``Dispatch`` carries that run (``created`` False).
    Held targets may be restored: holding a target is how an operator keeps migrations off it.
    """
    from tenants.models import Trigger

    with transaction.atomic():
        run, created = create_or_find_active_run(
            target,
            kind=RunKind.RESTORE,
            trigger=trigger or Trigger.COMMAND,
            triggered_by=acting_user,
            requested_revision=backup_run.revision_before or "base",
            restored_from=backup_run,
        )
    asked = {"kind": RunKind.RESTORE, "revision": backup_run.revision_before or "base"}
    if not created:
        return Dispatch(target, run, False, **asked)
    started = do_start_run(run.pk, worker_host=worker_host)
    if started is None:
        run.refresh_from_db()
        return Dispatch(
            target, None, False, f"restore run #{run.pk} was {run.status} at once", **asked
        )
    logger.info(
        "Restore of run %s's backup started on %s (run %s)", backup_run.pk, target.name, run.pk
    )
    return Dispatch(target, started, True, **asked)


@transaction.atomic
def do_record_restore(run, result, *, heads):
    """Record a successful restore (a ``migrator.backups.RestoreResult``) on the run, and the
    revision read back from the target's ``alembic_version`` on the target. Returns the run.

    The target's verification (fingerprint, drift, when verified) is cleared: it described the
    schema the restore replaced, and a restore verifies nothing, so the target reads "not
    verified" until the next upgrade or fleet check verifies it.
    """
    target = run.target
    target.schema_fingerprint = ""
    target.drifted = False
    target.drift_report = ""
    target.verified_at = None
    cleared = ["schema_fingerprint", "drifted", "drift_report", "verified_at"]
    record_success(
        run, result, status=RunStatus.SUCCEEDED, heads=heads, changed=True, target_fields=cleared
    )
    logger.info("Restored %s (run %s); it stands at %s", target.name, run.pk, target.revision)
    return run
