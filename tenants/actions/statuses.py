"""Where a target stands: its status from its revision and the current heads, saved so that a
held target stays held, and the stored statuses reconciled with the heads on disk.
"""

import logging

from django.db import models
from django.utils import timezone

from migrator import process
from tenants.actions.saves import save_fields
from tenants.models import MigrationTarget, TargetStatus

logger = logging.getLogger(__name__)


def unless_held(status):
    """``status`` for a target, as an expression that keeps a held target held: the record of a
    run that ends after its target was held says so without reading the target again."""
    return models.Case(
        models.When(held=True, then=models.Value(TargetStatus.HELD)),
        default=models.Value(status),
        output_field=models.CharField(),
    )


def save_status(target, status, fields):
    """Save ``fields`` of ``target`` with ``status``, or ``held`` when it is held by then."""
    target.status = status
    save_fields(target, fields, unless_held=True)
    target.status = TargetStatus.HELD if target.held else status


def target_status_for(revision, heads):
    """Up to date when every head is applied (is ``revision`` or below it:
    ``migrator.runner.up_to_date``), else behind."""
    from migrator import phases, runner

    if runner.up_to_date(heads, phases.applied(revision)):
        return TargetStatus.UP_TO_DATE
    return TargetStatus.BEHIND


def do_reconcile_statuses(heads):
    """Make the stored status of every target recorded up to date or behind agree with
    ``heads``: a revision deployed makes the targets at the old head behind at once (no run
    needed), and a head taken away makes those at the new one up to date. One read of the
    distinct (revision, status) pairs, and an UPDATE only where one disagrees; held, failed,
    migrating and unknown targets are left alone. Returns how many targets changed."""
    pairs = set(
        MigrationTarget.objects.filter(status__in=(TargetStatus.UP_TO_DATE, TargetStatus.BEHIND))
        .order_by()
        .values_list("revision", "status")
        .distinct()
    )
    wrong = {}  # the status a revision should show -> the revisions showing the other one
    for revision, status in pairs:
        should = target_status_for(revision, heads)
        if should != status:
            wrong.setdefault(should, []).append(revision)
    changed = 0
    now = timezone.now()
    for should, revisions in wrong.items():
        changed += (
            MigrationTarget.objects.filter(revision__in=revisions)
            .exclude(status=should)
            .filter(status__in=(TargetStatus.UP_TO_DATE, TargetStatus.BEHIND))
            .update(status=should, updated_at=now)
        )
    if changed:
        logger.info(
            "Head(s) now %s: %s target(s) moved between up to date and behind",
            ", ".join(heads) or "base",
            changed,
        )
    return changed


class _ReconciledHeads:
    """The heads this process last made the stored statuses agree with."""

    heads = None


def current_heads():
    """The script directory's head revision(s) as on disk now (``migrator.runner.heads``),
    after making the stored statuses agree with them: once per process each time they change,
    so the dashboard, /readyz, /metrics, the API and the admin never show a target up to date
    at a head that is no longer the head."""
    from migrator import runner

    heads = runner.heads()
    if heads != _ReconciledHeads.heads:
        do_reconcile_statuses(heads)
        _ReconciledHeads.heads = heads
    return heads


def reconcile_with_current_heads():
    """``current_heads()`` for pages and loops that show or keep statuses: None, logged, when
    the script directory cannot be read (the page says so its own way)."""
    try:
        return current_heads()
    except Exception:  # noqa: BLE001 - an unreadable directory must not take a page down
        logger.warning("Cannot read the head revision(s) to check the statuses", exc_info=True)
        return None


def _forget_reconciled_heads():
    """Reconcile again at the next ``current_heads`` (``process.reset()``). A forked worker
    keeps what its parent reconciled: the statuses agree with those heads either way."""
    _ReconciledHeads.heads = None


process.register("tenants.reconciled_heads", reset=_forget_reconciled_heads)
