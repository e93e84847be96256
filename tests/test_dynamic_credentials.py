"""Admin credentials from Vault's database secrets engine (README: "Dynamic credentials"),
against a real OpenBao whose database engine manages users on the local PostgreSQL and MariaDB:
a user made for each run and dropped after it, its tables owned by a stable owner role, a dead
worker's user dropped when its lease ends, and each misconfiguration named with its fix."""

import logging
import os
import secrets as random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrator.tasks import run_migration
from tenants import actions
from tenants.models import MigrationRun, Trigger
from tests import services
from tests.dispatch_fixtures import HEAD

pytestmark = [pytest.mark.vault, pytest.mark.postgres, pytest.mark.mysql, pytest.mark.django_db]

FIXTURES = Path(__file__).parent / "alembic_fixtures"
TTL = 4  # seconds: short, so that a dead worker's user goes within the test


@pytest.fixture
def engine(vault, settings, postgres_server, mysql_server):
    made = services.VaultDatabaseEngine(vault, postgres_server, mysql_server, ttl=TTL)
    settings.VAULT_DATABASE_MOUNT_POINT = made.mount
    yield made
    made.close()


def dynamic_tenant(registered_tenant, vault_secret, engine, provider="postgresql", **secret):
    """A tenant whose secret names a Vault role instead of an admin pair. On PostgreSQL its
    database's owner is the owner role, and the app user gets its grants by that role's
    default privileges (README)."""
    tenant = registered_tenant(provider)
    db = tenant.database
    role = f"adm-{random.token_hex(3)}"
    if provider == "postgresql":
        engine.pg_role(role, owner=db.admin_username)
        with engine.postgres.connect(db.database) as conn:
            conn.execute(
                f'ALTER DEFAULT PRIVILEGES FOR ROLE "{db.admin_username}" IN SCHEMA public '
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO "{db.app_username}"'
            )
            conn.execute(
                f'ALTER DEFAULT PRIVILEGES FOR ROLE "{db.admin_username}" IN SCHEMA public '
                f'GRANT USAGE ON SEQUENCES TO "{db.app_username}"'
            )
        secret.setdefault("owner_role", db.admin_username)
    else:
        engine.mysql_role(role, database=db.database)
    data = db.secret(admin_credentials="dynamic", admin_role=role, **secret)
    del data["admin_username"], data["admin_password"]
    vault_secret(tenant.target.vault_path, data)
    tenant.role = role
    return tenant


def migrate_once(target):
    [dispatch] = actions.do_enqueue_runs([target], trigger=Trigger.COMMAND, enqueue=False)
    run_migration(dispatch.run.pk)
    dispatch.run.refresh_from_db()
    return dispatch.run


def table_owners(postgres_server, database):
    with postgres_server.connect(database) as conn:
        return dict(
            conn.execute("SELECT tablename, tableowner FROM pg_tables WHERE schemaname = 'public'")
        )


def wait_until(condition, *, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout}s"
        time.sleep(0.25)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_fleet_migrates_with_dynamic_credentials_and_leaves_no_user(
    registered_tenant, vault_secret, engine, postgres_server, admin_client
):
    from tests.workers import manage, process_env

    tenants = [
        dynamic_tenant(registered_tenant, vault_secret, engine, "postgresql"),
        dynamic_tenant(registered_tenant, vault_secret, engine, "postgresql"),
        dynamic_tenant(registered_tenant, vault_secret, engine, "mysql"),
    ]
    done = manage(
        "migrate_tenants",
        "--all",
        "--sync",
        env=process_env(VAULT_DATABASE_MOUNT_POINT=engine.mount),
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr

    for tenant in tenants:
        run = MigrationRun.objects.get(target=tenant.target)
        assert (run.status, run.revision_after) == ("succeeded", HEAD), run.error
        assert run.admin_credentials == "dynamic"
        assert run.credentials_user.startswith("v-")
        assert run.credentials_lease.startswith(f"{engine.mount}/creds/{tenant.role}/…")
        assert run.credentials_revoked is True
        assert "; revoked after the run" in run.log
        # The grant check after the upgrade ran with the app user's own grants.
        assert "App user grants not checked" not in run.log
        assert "Grants" in run.log
    run = MigrationRun.objects.get(target=tenants[2].target)
    page = admin_client.get(f"/admin/tenants/migrationrun/{run.pk}/change/").content.decode()
    assert "Admin credentials" in page and run.credentials_lease in page
    shown = run.outcome()  # the API, --json
    assert (shown["admin_credentials"], shown["credentials_revoked"]) == ("dynamic", True)
    # No user Vault made is left on either server.
    assert engine.vault_users() == []
    # PostgreSQL: every table belongs to the owner role, not to the users that are gone, and
    # the app user got its grants from the owner role's default privileges.
    for tenant in tenants[:2]:
        owners = table_owners(postgres_server, tenant.database.database)
        assert "alembic_version" in owners and "projects" in owners
        assert set(owners.values()) == {tenant.database.admin_username}
        run = MigrationRun.objects.get(target=tenant.target)
        assert f"Grants of app user {tenant.database.app_username}: as expected" in run.log


def test_a_missing_role_names_the_path_and_the_fix(registered_tenant, vault_secret, engine):
    tenant = dynamic_tenant(registered_tenant, vault_secret, engine)
    data = tenant.database.secret(
        admin_credentials="dynamic", admin_role="no-such-role", owner_role="x"
    )
    vault_secret(tenant.target.vault_path, data)
    run = migrate_once(tenant.target)
    assert (run.status, run.error_code) == ("failed", "vault_role_not_found")
    assert f"{engine.mount}/roles/no-such-role" in run.error
    assert f"bao write {engine.mount}/roles/no-such-role" in run.error
    assert f"secret/data/database/{tenant.target.vault_path}" in run.error


def test_a_policy_that_cannot_read_creds_names_the_path_and_the_policy(
    registered_tenant, vault_secret, engine, settings
):
    tenant = dynamic_tenant(registered_tenant, vault_secret, engine)
    engine.client.sys.create_or_update_policy(
        "kv-only", 'path "secret/data/database/*" { capabilities = ["read"] }'
    )
    settings.VAULT_TOKEN = engine.client.auth.token.create(policies=["kv-only"])["auth"][
        "client_token"
    ]
    run = migrate_once(tenant.target)
    assert (run.status, run.error_code) == ("failed", "vault_forbidden")
    path = f"{engine.mount}/creds/{tenant.role}"
    assert f"may not read {path} (permission denied)" in run.error
    assert f'path "{path}" {{ capabilities = ["read"] }}' in run.error


def test_a_user_that_cannot_take_the_owner_role_fails_before_any_ddl(
    registered_tenant, vault_secret, engine, postgres_server
):
    tenant = dynamic_tenant(registered_tenant, vault_secret, engine)
    engine.pg_role(tenant.role, owner=tenant.database.admin_username, grant_owner=False)
    run = migrate_once(tenant.target)
    assert (run.status, run.error_code) == ("failed", "owner_role_failed"), run.error
    owner = tenant.database.admin_username
    assert run.error.startswith(f"Nothing ran on {tenant.target.name}")
    assert f"could not switch to the owner role '{owner}'" in run.error
    assert f'GRANT "{owner}" TO "{{{{name}}}}"' in run.error
    # Not a grant to the user Vault made for this run, which is gone by now.
    assert f'TO "{run.credentials_user}"' not in run.error
    assert table_owners(postgres_server, tenant.database.database) == {}
    # Its user was revoked all the same.
    assert run.credentials_revoked is True
    assert engine.vault_users() == []


def test_a_static_user_that_cannot_take_the_owner_role_is_told_the_grant(
    registered_tenant, vault_secret, postgres_server
):
    """A KV admin user with an owner_role it is not a member of: the fix is one GRANT to that
    user, not a Vault role's creation statements."""
    tenant = registered_tenant("postgresql")
    owner = f"own_{random.token_hex(4)}"
    with postgres_server.connect() as conn:
        conn.execute(f'CREATE ROLE "{owner}" NOLOGIN')
    try:
        vault_secret(tenant.target.vault_path, tenant.database.secret(owner_role=owner))
        run = migrate_once(tenant.target)
    finally:
        with postgres_server.connect() as conn:
            conn.execute(f'DROP ROLE "{owner}"')
    assert (run.status, run.error_code) == ("failed", "owner_role_failed"), run.error
    admin = tenant.database.admin_username
    assert f'Grant it: GRANT "{owner}" TO "{admin}"; Or correct owner_role' in run.error
    assert "{{name}}" not in run.error


def test_postgresql_dynamic_credentials_need_an_owner_role(registered_tenant, vault_secret, engine):
    tenant = dynamic_tenant(registered_tenant, vault_secret, engine)
    data = tenant.database.secret(admin_credentials="dynamic", admin_role=tenant.role)
    vault_secret(tenant.target.vault_path, data)
    run = migrate_once(tenant.target)
    assert (run.status, run.error_code) == ("failed", "secret_incomplete")
    assert "names no owner_role" in run.error and "vault kv patch" in run.error
    assert engine.vault_users() == []  # refused before any user was made


def test_a_revocation_the_policy_refuses_is_reported_and_the_ttl_ends_the_user(
    registered_tenant, vault_secret, engine, settings
):
    tenant = dynamic_tenant(registered_tenant, vault_secret, engine)
    path = f"{engine.mount}/creds/{tenant.role}"
    engine.client.sys.create_or_update_policy(
        "no-revoke",
        'path "secret/data/database/*" { capabilities = ["read"] }\n'
        f'path "{path}" {{ capabilities = ["read"] }}',
    )
    settings.VAULT_TOKEN = engine.client.auth.token.create(policies=["no-revoke"])["auth"][
        "client_token"
    ]
    run = migrate_once(tenant.target)
    assert run.status == "succeeded", run.error
    assert run.credentials_revoked is False
    assert "NOT revoked" in run.log and "may not revoke it (permission denied)" in run.log
    assert f'path "sys/leases/revoke/{path}/*"' in run.log
    assert run.credentials_user in engine.vault_users()
    wait_until(
        lambda: run.credentials_user not in engine.vault_users(),
        timeout=60,
        what="Vault drops the user when its lease ends",
    )


def test_static_role_credentials_are_read_fresh(
    registered_tenant, vault_secret, engine, postgres_server
):
    tenant = registered_tenant("postgresql")
    db = tenant.database
    role = engine.static_role(f"st-{random.token_hex(3)}", username=db.admin_username)
    data = db.secret(admin_credentials="static-role", admin_role=role)
    del data["admin_password"]
    vault_secret(tenant.target.vault_path, data)
    first = migrate_once(tenant.target)
    assert first.status == "succeeded", first.error
    assert (first.admin_credentials, first.credentials_user) == ("static-role", db.admin_username)
    assert first.credentials_lease == "" and first.credentials_revoked is None
    # Vault rotates the password; the next run reads the new one.
    engine.client.write(f"{engine.mount}/rotate-role/{role}")
    tenant.target.refresh_from_db()
    second = migrate_once(tenant.target)
    assert second.status == "skipped", second.error


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_killed_worker_leaves_a_user_that_goes_when_its_lease_ends(
    registered_tenant, vault_secret, engine, settings, tmp_path
):
    from tests.workers import ROOT, process_env

    tenant = dynamic_tenant(registered_tenant, vault_secret, engine)
    signal_file = tmp_path / "inside"
    process = subprocess.Popen(
        [sys.executable, "manage.py", "migrate_tenants", "--target", tenant.target.name, "--sync"],
        cwd=ROOT,
        env=process_env(
            VAULT_DATABASE_MOUNT_POINT=engine.mount,
            TENANT_MIGRATIONS_DIR=str(FIXTURES / "slow"),
            MIGRATOR_TEST_SIGNAL=str(signal_file),
            MIGRATOR_TEST_SLEEP="120",
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_until(signal_file.exists, timeout=90, what="the slow revision starts")
        run = MigrationRun.objects.get(target=tenant.target)
        # Recorded when it was issued: the run shows which user and lease it holds.
        assert run.admin_credentials == "dynamic" and run.credentials_revoked is None
        user = run.credentials_user
        assert user in engine.vault_users()
        # While the worker lives its lease is renewed: the user outlives its TTL.
        time.sleep(TTL + 2)
        assert process.poll() is None and user in engine.vault_users()
        os.killpg(process.pid, signal.SIGKILL)  # no cleanup of any kind
        process.wait()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    wait_until(
        lambda: user not in engine.vault_users(),
        timeout=60,
        what="OpenBao's expiration drops the dead worker's user",
    )


def test_vault_check_checks_each_mode(registered_tenant, vault_secret, engine):
    from io import StringIO

    from django.core.management import call_command
    from django.core.management.base import CommandError

    dynamic = dynamic_tenant(registered_tenant, vault_secret, engine)
    static = registered_tenant("postgresql")
    pinned = registered_tenant("postgresql")
    role = engine.static_role(f"st-{random.token_hex(3)}", username=pinned.database.admin_username)
    vault_secret(
        pinned.target.vault_path,
        pinned.database.secret(admin_credentials="static-role", admin_role=role),
    )
    missing = registered_tenant("mysql")
    data = missing.database.secret(admin_credentials="dynamic", admin_role="gone")
    vault_secret(missing.target.vault_path, data)

    out = StringIO()
    with pytest.raises(CommandError, match="1 of 4 targets not OK"):
        call_command("vault_check", stdout=out)
    output = out.getvalue()
    owner = dynamic.database.admin_username
    assert f"OK    {dynamic.target.name}: " in output
    assert f"dynamic {engine.mount}/creds/{dynamic.role}: made user v-" in output
    assert f"and revoked it (lease TTL {TTL}s); logged in and ran SET ROLE {owner}" in output
    assert f"OK    {static.target.name}: secret/data/database/" in output
    assert (
        f"static role {engine.mount}/static-creds/{role}: user {pinned.database.admin_username}"
        in output
    )
    assert f"FAIL  {missing.target.name}: DatabaseRoleNotFound: Vault has no role gone" in output
    assert engine.vault_users() == []


def test_vault_check_fails_a_role_whose_users_cannot_take_the_owner_role(
    registered_tenant, vault_secret, engine
):
    """A Vault role without the README's GRANT of the owner role: vault_check said OK ("runs
    SET ROLE ...") and every run then failed with owner_role_failed. It logs in as the user it
    made and runs SET ROLE before revoking it, and fails the target with the run's message."""
    from io import StringIO

    from django.core.management import call_command
    from django.core.management.base import CommandError

    tenant = dynamic_tenant(registered_tenant, vault_secret, engine)
    owner = tenant.database.admin_username
    engine.pg_role(tenant.role, owner=owner, grant_owner=False)

    out = StringIO()
    with pytest.raises(CommandError, match="1 of 1 targets not OK"):
        call_command("vault_check", "--target", tenant.target.name, stdout=out)
    output = out.getvalue()
    assert f"FAIL  {tenant.target.name}: OwnerRoleFailed: " in output, output
    assert f"could not switch to the owner role '{owner}'" in output
    assert f'GRANT "{owner}" TO "{{{{name}}}}"' in output
    assert engine.vault_users() == []  # the user it made was revoked all the same


def test_a_run_longer_than_its_lease_keeps_its_user_under_the_readme_policy(
    registered_tenant, vault_secret, engine, settings, monkeypatch, caplog
):
    """The README's policy for dynamic credentials is enough: read the creds, renew the lease
    (Vault's default policy) while the revision outlasts its TTL, revoke it afterwards."""
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "slow")
    monkeypatch.setenv("MIGRATOR_TEST_SLEEP", str(TTL + 3))
    tenant = dynamic_tenant(registered_tenant, vault_secret, engine)
    path = f"{engine.mount}/creds/{tenant.role}"
    engine.client.sys.create_or_update_policy(
        "readme-dynamic",
        'path "secret/data/database/*" { capabilities = ["read"] }\n'
        f'path "{path}" {{ capabilities = ["read"] }}\n'
        f'path "sys/leases/revoke/{path}/*" {{ capabilities = ["update"] }}',
    )
    settings.VAULT_TOKEN = engine.client.auth.token.create(policies=["readme-dynamic"])["auth"][
        "client_token"
    ]
    caplog.set_level(logging.DEBUG, logger="migrator.secrets")
    run = migrate_once(tenant.target)
    assert (run.status, run.revision_after) == ("succeeded", "s003_last"), run.error
    assert "Renewed the lease" in caplog.text
    assert "Renewing the lease" not in caplog.text  # never refused
    assert run.credentials_revoked is True, run.log
    assert engine.vault_users() == []


def test_a_backup_and_its_restore_with_dynamic_credentials_leave_tables_to_the_owner(
    registered_tenant, vault_secret, engine, postgres_server, settings, tmp_path
):
    """pg_dump and pg_restore take the owner role too (--role): a restored table belongs to it,
    not to the user Vault drops after the restore."""
    from io import StringIO

    from django.core.management import call_command

    settings.BACKUP_DIR = str(tmp_path / "backups")
    tenant = dynamic_tenant(registered_tenant, vault_secret, engine)
    target = tenant.target
    [dispatch] = actions.do_enqueue_runs(
        [target], trigger=Trigger.COMMAND, enqueue=False, revision="0002_projects"
    )
    run_migration(dispatch.run.pk)
    target.backup_policy = "on"
    target.save(update_fields=["backup_policy"])
    run = migrate_once(target)
    assert run.status == "succeeded" and run.backup_path, run.error

    out = StringIO()
    call_command("restore_target", "--run", str(run.pk), "--yes", stdout=out)
    restored = MigrationRun.objects.filter(kind="restore").get()
    assert restored.status == "succeeded", restored.error
    owners = table_owners(postgres_server, tenant.database.database)
    assert "projects" in owners
    assert set(owners.values()) == {tenant.database.admin_username}
    assert engine.vault_users() == []


def test_a_revocation_vault_fails_is_retried_then_reported(
    registered_tenant, vault_secret, engine, caplog
):
    tenant = dynamic_tenant(registered_tenant, vault_secret, engine)
    engine.pg_role(tenant.role, owner=tenant.database.admin_username, revocation="SELECT 1/0;")
    caplog.set_level(logging.WARNING, logger="migrator.secrets")
    run = migrate_once(tenant.target)
    assert run.status == "succeeded", run.error
    assert run.credentials_revoked is False
    assert "NOT revoked" in run.log and "division by zero" in run.log
    tries = [r for r in caplog.records if "failed (attempt" in r.getMessage()]
    assert [r.getMessage().split("(attempt ")[1][:6] for r in tries] == [
        "1 of 3",
        "2 of 3",
        "3 of 3",
    ]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("Revoking the lease" in message for message in errors)  # the worker's log
    assert run.credentials_user in engine.vault_users()  # left to the engine's cleanup


@pytest.mark.django_db(transaction=True)
def test_a_dry_run_reads_a_dynamic_target_live_and_leaves_no_user(
    registered_tenant, vault_secret, engine
):
    from tests.workers import manage, process_env

    tenant = dynamic_tenant(registered_tenant, vault_secret, engine)
    env = process_env(VAULT_DATABASE_MOUNT_POINT=engine.mount)
    assert manage("migrate_tenants", "--all", "--sync", env=env).returncode == 0
    shown = manage("migrate_tenants", "--all", "--dry-run", env=env)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    line = next(line for line in shown.stdout.splitlines() if line.startswith(tenant.id + " "))
    assert HEAD in line and "live" in line
    assert engine.vault_users() == []
