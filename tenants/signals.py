"""A new tenant with a database of its own is migrated as soon as it exists.

The equivalent of the original design's ``TenantDatabaseProvisionedIntegrationEvent``: the run is
created in the same transaction as the tenant and queued when it commits. Shared-tier tenants
need nothing: their shared database is migrated for all of them.
"""

import logging

from django.db.models.signals import post_save
from django.dispatch import receiver

from tenants import actions, planning
from tenants.models import Strategy, Tenant, Trigger

logger = logging.getLogger("tenants.signals")


@receiver(post_save, sender=Tenant, dispatch_uid="tenants.migrate_new_tenant")
def migrate_new_tenant(sender, instance, created, raw=False, **kwargs):
    if not created or raw or not instance.auto_migrate or instance.target_id is None:
        return
    if instance.strategy == Strategy.SHARED:
        return
    rows = planning.plan([instance.target], planning.Intent.upgrade())
    for row in rows:
        if not row.accepted:
            logger.warning("New tenant %s: not queued: %s", instance.pk, row.reason)
    actions.do_enqueue_plan(rows, trigger=Trigger.SIGNAL)
