"""A password written to Vault appears nowhere else: not in a log line, a model field of the
control-plane database, django-q2's task results, an admin page or an API response."""

import logging
import secrets

import pytest
from django.apps import apps
from django.urls import reverse

from tenants.models import MigrationRun, MigrationTarget
from tests.workers import manage, process_env, qcluster

pytestmark = [pytest.mark.vault, pytest.mark.postgres, pytest.mark.mysql, pytest.mark.slow]


@pytest.mark.django_db(transaction=True)
def test_canary_password_never_leaks(
    registered_tenant,
    vault_secret,
    postgres_server,
    caplog,
    tmp_path,
    admin_client,
    django_user_model,
):
    from knox.models import AuthToken
    from psycopg import sql

    canary_ok = f"CANARY-ok-{secrets.token_hex(8)}"
    canary_bad = f"CANARY-bad-{secrets.token_hex(8)}"
    canary_app = f"CANARY-app-{secrets.token_hex(8)}"
    canaries = (canary_ok, canary_bad, canary_app)

    # A PostgreSQL tenant whose real admin password is the canary: it migrates.
    good = registered_tenant("postgresql")
    with postgres_server.connect() as conn:
        conn.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                sql.Identifier(good.database.admin_username), sql.Literal(canary_ok)
            )
        )
    vault_secret(
        good.target.vault_path,
        good.database.secret(admin_password=canary_ok, app_password=canary_app),
    )
    # A MariaDB tenant whose secret holds a wrong password, the canary: it fails to log in.
    bad = registered_tenant("mysql")
    vault_secret(bad.target.vault_path, bad.database.secret(admin_password=canary_bad))

    caplog.set_level(logging.DEBUG)
    # In this process, then through a real worker cluster (which stores django-q2 task results).
    manage_log = tmp_path / "qcluster.log"
    env = process_env(LOG_LEVEL="DEBUG")
    first = manage("migrate_tenants", "--all", "--sync", env=env)
    with qcluster(env, manage_log):
        second = manage("migrate_tenants", "--all", "--wait", "--json", "--timeout", "60", env=env)
    assert MigrationRun.objects.filter(target=good.target, status="succeeded").exists()
    assert MigrationRun.objects.filter(
        target=bad.target, error_code="database_auth_failed"
    ).exists()

    texts = {
        "command output": first.stdout + first.stderr + second.stdout + second.stderr,
        "worker log": manage_log.read_text(),
        "captured logs": caplog.text,
    }
    # Every field of every row of every model in the control-plane database.
    for model in apps.get_models():
        for obj in model._default_manager.all():
            for field in model._meta.concrete_fields:
                texts[f"{model._meta.label}.{field.name}"] = texts.get(
                    f"{model._meta.label}.{field.name}", ""
                ) + repr(getattr(obj, field.attname))
    # django-q2's own tables (Task: results it kept; OrmQ: queued payloads) were in that scan.
    from django_q.models import OrmQ, Task

    assert {Task._meta.label, OrmQ._meta.label} <= {
        model._meta.label for model in apps.get_models()
    }

    # The admin pages and the API.
    pages = [
        reverse("admin:tenants_migrationrun_changelist"),
        reverse("admin:tenants_migrationtarget_changelist"),
        reverse("admin:tenants_tenant_changelist"),
        reverse("fleet-dashboard"),
    ]
    pages += [
        reverse("admin:tenants_migrationrun_change", args=[r.pk])
        for r in MigrationRun.objects.all()
    ]
    pages += [
        reverse("admin:tenants_migrationtarget_change", args=[t.pk])
        for t in MigrationTarget.objects.all()
    ]
    for url in pages:
        response = admin_client.get(url)
        assert response.status_code == 200, url
        texts[url] = response.content.decode()

    from django.contrib.auth.models import Permission

    operator = django_user_model.objects.create_user("operator")
    operator.user_permissions.add(Permission.objects.get(codename="run_migrations"))
    token = AuthToken.objects.create(user=operator)[1]
    from django.test import Client

    api = Client(headers={"Authorization": f"Bearer {token}"})
    for run in MigrationRun.objects.all():
        texts[f"/api/runs/{run.pk}"] = api.get(f"/api/runs/{run.pk}").content.decode()
    texts["POST migrate"] = api.post(f"/api/tenants/{bad.id}/migrate").content.decode()

    leaks = [
        (where, canary) for where, text in texts.items() for canary in canaries if canary in text
    ]
    assert leaks == []
    # And the scan looked at real content: the failure's error and the runs are all there.
    assert any("database_auth_failed" in text for text in texts.values())
    assert bad.database.admin_username in texts["command output"]
