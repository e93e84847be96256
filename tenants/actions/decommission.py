"""Retiring tenants and targets: no more runs, history kept."""

import logging
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from tenants.actions.cancellation import do_cancel_queued_runs
from tenants.models import MigrationTarget, RunStatus

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decommission:
    """What retiring a tenant or a target did: ``done`` (now retired), or ``refusal``."""

    done: bool
    refusal: str = ""
    cancelled: tuple = ()  # runs cancelled (they were queued)


def do_decommission_target(target, *, acting_user=None):
    """Retire ``target``: the planner and the queue refuse it every run from now on, saying so;
    its runs, backups and history are kept. Its queued run is cancelled. Refused while a run is
    running (it holds the database's lock: wait for it) or while tenants that are not
    decommissioned live in it (a shared database: retire or move them first).
    """
    from tenants.models import Tenant

    with transaction.atomic():
        target = MigrationTarget.objects.select_for_update().get(pk=target.pk)
        if target.decommissioned_at is not None:
            return Decommission(False, f"{target.name} is already decommissioned.")
        running = target.runs.filter(status=RunStatus.RUNNING).first()
        if running is not None:
            return Decommission(
                False,
                f"Run #{running.pk} is migrating {target.name}: wait for it to finish, then "
                "decommission the target.",
            )
        living = list(
            Tenant.objects.filter(target=target, decommissioned_at=None).values_list(
                "id", flat=True
            )[:11]
        )
        if living:
            more = ", …" if len(living) > 10 else ""
            return Decommission(
                False,
                f"{target.name} still holds tenant(s) {', '.join(living[:10])}{more}: "
                "decommission them first.",
            )
        cancelled, _ = do_cancel_queued_runs([target], acting_user=acting_user)
        target.decommissioned_at = timezone.now()
        target.save(update_fields=["decommissioned_at", "updated_at"])
    logger.info("Target %s decommissioned by %s", target.name, acting_user or "an operator")
    return Decommission(True, cancelled=tuple(cancelled))


def do_decommission_tenant(tenant, *, acting_user=None):
    """Retire ``tenant``; a dedicated or external tenant's own database is retired with it
    (``do_decommission_target``: no more runs, history kept, its queued run cancelled). A
    shared-tier tenant leaves its shared database as it is. Refused while its own database has
    a running run."""
    from tenants.models import Strategy, Tenant

    with transaction.atomic():
        tenant = Tenant.objects.select_for_update().select_related("target").get(pk=tenant.pk)
        if tenant.decommissioned_at is not None:
            return Decommission(False, f"Tenant {tenant.id} is already decommissioned.")
        tenant.decommissioned_at = timezone.now()
        tenant.save(update_fields=["decommissioned_at"])
        target = tenant.target
        if tenant.strategy == Strategy.SHARED or target is None or target.decommissioned:
            outcome = Decommission(True)
        else:
            outcome = do_decommission_target(target, acting_user=acting_user)
            if not outcome.done:
                transaction.set_rollback(True)
                return Decommission(False, f"Tenant {tenant.id}: {outcome.refusal}")
    logger.info("Tenant %s decommissioned by %s", tenant.id, acting_user or "an operator")
    return outcome
