"""Held targets recorded before holding set the status: show them as held (the dashboard's Held
tile and /readyz count the status). Releasing one later sets where it stands."""

from django.db import migrations


def show_held_as_held(apps, schema_editor):
    MigrationTarget = apps.get_model("tenants", "MigrationTarget")
    MigrationTarget.objects.filter(held=True).exclude(status="held").update(status="held")


class Migration(migrations.Migration):
    dependencies = [("tenants", "0003_backups_verification_phases")]

    operations = [migrations.RunPython(show_held_as_held, migrations.RunPython.noop)]
