from django.apps import AppConfig


class TenantsConfig(AppConfig):
    name = "tenants"
    verbose_name = "Tenants and migrations"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self):
        from django.db.models.signals import post_migrate

        from tenants import signals  # noqa: F401 - connects the receivers

        post_migrate.connect(ensure_schedules, sender=self)


RECOVERY_SCHEDULE = "tenants: recover stale runs"
DRIFT_SCHEDULE = "tenants: re-check the fleet for drift"
DRIFT_TASK = "migrator.tasks.check_fleet_for_drift"


def ensure_schedules(sender, **kwargs):
    """Create the periodic django-q2 schedules the control plane relies on (idempotent)."""
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone
    from django_q.models import Schedule

    schedules = Schedule.objects.using(kwargs.get("using", "default"))
    # Recovery is no queued schedule any more: queued, it waited behind the long migrations it
    # watches over. Each qcluster's main process runs it every minute (controlplane's qcluster).
    schedules.filter(name=RECOVERY_SCHEDULE).delete()
    # Drift re-check every VERIFY_SCHEDULE_MINUTES; 0 turns it off (and removes the schedule).
    # The first check comes one period after the schedule is created, not at the first start.
    minutes = settings.VERIFY_SCHEDULE_MINUTES
    if minutes <= 0:
        schedules.filter(name=DRIFT_SCHEDULE).delete()
        return
    drift, created = schedules.get_or_create(
        name=DRIFT_SCHEDULE,
        defaults={
            "func": DRIFT_TASK,
            "schedule_type": Schedule.MINUTES,
            "minutes": minutes,
            "repeats": -1,
            "next_run": timezone.now() + timedelta(minutes=minutes),
        },
    )
    if created:
        return
    changed = []
    if drift.minutes != minutes:
        drift.minutes = minutes
        changed.append("minutes")
    if drift.func != DRIFT_TASK:
        # A schedule created before the task moved names its old path (migrator.verify).
        drift.func = DRIFT_TASK
        changed.append("func")
    if changed:
        drift.save(update_fields=changed)
