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


def ensure_schedules(sender, **kwargs):
    """Create the periodic django-q2 schedules the control plane relies on (idempotent)."""
    from django_q.models import Schedule

    Schedule.objects.using(kwargs.get("using", "default")).get_or_create(
        name=RECOVERY_SCHEDULE,
        defaults={
            "func": "migrator.tasks.recover_stale_runs",
            "schedule_type": Schedule.MINUTES,
            "minutes": 1,
            "repeats": -1,
        },
    )
