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
    texts.update(everything_shown(admin_client, django_user_model, migrate_tenant=bad.id))

    leaks = [
        (where, canary) for where, text in texts.items() for canary in canaries if canary in text
    ]
    assert leaks == []
    # And the scan looked at real content: the failure's error and the runs are all there.
    assert any("database_auth_failed" in text for text in texts.values())
    assert bad.database.admin_username in texts["command output"]


AUDIT_CONFIG = """
audit "file" "raw" {
  options = {
    file_path = "%s"
    log_raw = "true"
  }
}
"""


def issued_by_vault(audit_log):
    """Every password and lease id the OpenBao answered with, from its raw audit log."""
    import json

    found = set()

    def walk(value, key=""):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, k)
        elif isinstance(value, list):
            for v in value:
                walk(v, key)
        elif isinstance(value, str) and len(value) >= 8 and key in ("password", "lease_id"):
            found.add(value)

    for line in audit_log.read_text().splitlines():
        walk(json.loads(line).get("response") or {})
    return found


@pytest.mark.django_db(transaction=True)
def test_dynamic_and_static_role_passwords_never_leak(
    tenant_factory,
    pg_database,
    mysql_database,
    postgres_server,
    mysql_server,
    settings,
    caplog,
    tmp_path,
    admin_client,
    django_user_model,
):
    """The passwords Vault's database secrets engine makes (a user per run, a static role's
    rotated password) and the lease ids it hands out: OpenBao's raw audit log lists each one."""
    from tests import services

    audit_log = tmp_path / "audit.log"
    config = tmp_path / "audit.hcl"
    config.write_text(AUDIT_CONFIG % audit_log)
    server = services.OpenBaoServer(config=str(config)).start()
    try:
        settings.VAULT_ADDR, settings.VAULT_TOKEN = server.addr, server.root_token
        settings.VAULT_AUTH_METHOD = "token"
        engine = services.VaultDatabaseEngine(server, postgres_server, mysql_server, ttl=30)
        settings.VAULT_DATABASE_MOUNT_POINT = engine.mount
        kv = server.client().secrets.kv.v2

        def tenant(db, **secret):
            made = tenant_factory(provider=db.provider, auto_migrate=False)
            data = db.secret(**secret)
            if secret.get("admin_credentials") == "dynamic":
                del data["admin_username"], data["admin_password"]
            kv.create_or_update_secret(
                path=f"database/{made.target.vault_path}", secret=data, mount_point="secret"
            )
            return made

        pg, my, pinned = pg_database(), mysql_database(), pg_database()
        pg_role = engine.pg_role("pg-admin", owner=pg.admin_username)
        my_role = engine.mysql_role("my-admin", database=my.database)
        static_role = engine.static_role("pinned", username=pinned.admin_username)
        tenants = [
            tenant(
                pg, admin_credentials="dynamic", admin_role=pg_role, owner_role=pg.admin_username
            ),
            tenant(my, admin_credentials="dynamic", admin_role=my_role),
            tenant(pinned, admin_credentials="static-role", admin_role=static_role),
        ]

        caplog.set_level(logging.DEBUG)
        manage_log = tmp_path / "qcluster.log"
        env = process_env(LOG_LEVEL="DEBUG", VAULT_DATABASE_MOUNT_POINT=engine.mount)
        first = manage("migrate_tenants", "--all", "--sync", env=env)
        with qcluster(env, manage_log):
            second = manage(
                "migrate_tenants", "--all", "--wait", "--json", "--timeout", "60", env=env
            )
        check = manage("vault_check", env=env)
        runs = MigrationRun.objects.filter(target__in=[t.target for t in tenants])
        assert runs.filter(status="succeeded").count() == 3, list(runs.values("status", "error"))
        assert runs.filter(admin_credentials="dynamic", credentials_revoked=True).count() == 4

        texts = {
            "command output": "".join(r.stdout + r.stderr for r in (first, second, check)),
            "worker log": manage_log.read_text(),
            "captured logs": caplog.text,
        }
        texts.update(
            everything_shown(admin_client, django_user_model, migrate_tenant=tenants[0].id)
        )
        issued = issued_by_vault(audit_log)
        engine.close()
    finally:
        server.stop()
    # Two runs for each dynamic tenant and vault_check's check made a user each, with a lease.
    assert len(issued) >= 2 * 6
    leaks = [
        (where, value[:4]) for where, text in texts.items() for value in issued if value in text
    ]
    assert leaks == []
    # And the scan looked at real content: the users, the leases' safe forms, the modes.
    assert any(f"{engine.mount}/creds/pg-admin/…" in text for text in texts.values())
    assert "static role" in texts["command output"]


def everything_shown(admin_client, django_user_model, *, migrate_tenant):
    """What the control plane keeps and shows, by where: every field of every row of every
    model in its database (django-q2's task results and queued payloads among them), the admin
    pages and the API's answers (with a real token)."""
    from django.contrib.auth.models import Permission
    from django.test import Client
    from django_q.models import OrmQ, Task
    from knox.models import AuthToken

    texts = {}
    for model in apps.get_models():
        for obj in model._default_manager.all():
            for field in model._meta.concrete_fields:
                texts[f"{model._meta.label}.{field.name}"] = texts.get(
                    f"{model._meta.label}.{field.name}", ""
                ) + repr(getattr(obj, field.attname))
    assert {Task._meta.label, OrmQ._meta.label} <= {
        model._meta.label for model in apps.get_models()
    }
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

    operator = django_user_model.objects.create_user(f"operator-{secrets.token_hex(3)}")
    operator.user_permissions.add(Permission.objects.get(codename="run_migrations"))
    token = AuthToken.objects.create(user=operator)[1]
    api = Client(headers={"Authorization": f"Bearer {token}"})
    for run in MigrationRun.objects.all():
        texts[f"/api/runs/{run.pk}"] = api.get(f"/api/runs/{run.pk}").content.decode()
    texts["POST migrate"] = api.post(f"/api/tenants/{migrate_tenant}/migrate").content.decode()
    return texts
