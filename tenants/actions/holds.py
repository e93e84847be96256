"""Holding a target (every migration skips it) and releasing it."""

import logging

from django.db import transaction

from tenants.actions.statuses import target_status_for
from tenants.models import RunStatus, TargetStatus

logger = logging.getLogger(__name__)


@transaction.atomic
def do_set_held(target, *, held, acting_user=None):
    """Hold ``target`` (every migration skips it, and a queued one ends cancelled when it
    starts) or release it; its status says ``held`` while it is, and where it stands after.

    A released target is failed when its last run failed, migrating while a run is under way,
    else up to date or behind its heads (unknown before anything was read).
    """
    from migrator import runner

    target.held = held
    if held:
        status = TargetStatus.HELD
    elif target.runs.filter(status=RunStatus.RUNNING).exists():
        status = TargetStatus.MIGRATING
    elif target.last_error:
        status = TargetStatus.FAILED
    elif target.revision or target.last_checked_at:
        status = target_status_for(target.revision, runner.heads())
    else:
        status = TargetStatus.UNKNOWN
    target.status = status
    target.save(update_fields=["held", "status", "updated_at"])
    logger.info(
        "%s %s%s",
        target.name,
        "held" if held else "released",
        f" by {acting_user}" if acting_user else "",
    )
    return target
