"""What verifying a target's schema found: on the target, on the run just verified, or as a run
of kind ``verify`` when a fleet check finds something new.
"""

import logging

from django.db import transaction
from django.utils import timezone

from tenants.models import MigrationRun, RunKind, RunStatus

logger = logging.getLogger(__name__)


@transaction.atomic
def do_record_verification(
    target, verification, *, run=None, trigger=None, acting_user=None, record_run=False
):
    """Record what verifying ``target``'s schema found (a ``migrator.verify.Verification``).

    On the target: the fingerprint of its schema, whether it drifted from the reference for its
    revision, the drift report (schema and app-user grants) and, when it was compared, when.
    Its ``status`` is left alone: a drifted target is still up to date or behind.

    With ``run`` (the upgrade that was just verified) the report goes on that run. Without one
    (the fleet re-check, ``migrate_tenants --verify``) a finished run of kind ``verify`` is
    written when ``record_run`` is set, when drift appeared or went away, or when the report
    changed and shows drift or grant problems: the history says when each appeared, without a
    run per target per scheduled check. Returns that run, or None.
    """
    from tenants.models import Trigger

    now = timezone.now()
    was_drifted, previous_report = target.drifted, target.drift_report
    fields, report = take_verification(target, verification, now)
    target.save(update_fields=fields + ["updated_at"])

    if run is not None:
        run.drift_report = report
        run.save(update_fields=["drift_report"])
        return run
    changed = report != previous_report
    if not (
        record_run
        or was_drifted != target.drifted
        or (changed and (verification.drifted or verification.grant_problems))
    ):
        return None
    revision = (verification.revision or "")[:64]
    return MigrationRun.objects.create(
        target=target,
        kind=RunKind.VERIFY,
        trigger=trigger or Trigger.SCHEDULE,
        triggered_by=acting_user,
        requested_revision=revision or "base",
        status=RunStatus.SUCCEEDED,
        revision_before=revision,
        revision_after=revision,
        duration_ms=verification.duration_ms,
        log="\n".join(verification.log_lines()),
        drift_report=report,
        started_at=now,
        finished_at=now,
    )


def take_verification(target, verification, now):
    """Set what ``verification`` found on ``target`` (unsaved); return the fields it changed and
    the drift report."""
    report = verification.report()
    if verification.drifted and not target.drifted:
        logger.warning("%s drifted from the reference schema of its revision", target.name)
    target.drift_report = report
    target.drifted = verification.drifted
    fields = ["drift_report", "drifted"]
    if verification.fingerprint:
        target.schema_fingerprint = verification.fingerprint
        fields.append("schema_fingerprint")
    if verification.verified:
        target.verified_at = now
        fields.append("verified_at")
    return fields, report
