"""Every entry point dispatches real migrations and every outcome is recorded."""

import json
import threading

import pytest
from django.core.management import call_command
from django.db import connection
from django.urls import reverse

from tenants import actions
from tenants.models import MigrationRun, MigrationTarget, Tenant, Trigger
from tests.dispatch_fixtures import HEAD
from tests.workers import manage, process_env, qcluster, wait_for_runs

pytestmark = [pytest.mark.vault, pytest.mark.postgres, pytest.mark.mysql]


def run_command(*args):
    """call_command that returns (exit code, stdout, stderr)."""
    import io

    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("migrate_tenants", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue(), err.getvalue()


@pytest.mark.django_db
def test_sync_run_over_good_and_failing_targets(registered_tenant):
    pg = registered_tenant("postgresql")
    my = registered_tenant("mysql")
    broken = registered_tenant("missing-secret")

    code, out, err = run_command("--all", "--sync")

    assert code == 1
    runs = {run.target.name: run for run in MigrationRun.objects.select_related("target")}
    for tenant in (pg, my):
        run = runs[tenant.id]
        assert run.status == "succeeded", run.error
        assert run.revision_before == ""
        assert run.revision_after == HEAD
        assert run.applied[-1] == HEAD and len(run.applied) == 6
        assert run.trigger == "command" and run.worker_host
        assert f"Successfully applied 6 migrations for tenant {tenant.id}" in run.log
        target = MigrationTarget.objects.get(pk=tenant.target_id)
        assert (target.status, target.revision) == ("up_to_date", HEAD)
    failed = runs[broken.id]
    assert failed.status == "failed"
    assert failed.error_code == "secret_not_found"
    assert f"secret/data/database/{broken.id}" in failed.error
    assert "vault kv put" in failed.error
    assert MigrationTarget.objects.get(pk=broken.target_id).status == "failed"
    # The summary table names each target and its outcome.
    assert broken.id in out and "failed" in out and "succeeded" in out

    # A second pass has nothing to apply: the good targets are skipped, still exit 1.
    code, out, _ = run_command("--tenant", pg.id, my.id, "--sync", "--json")
    assert code == 0
    results = {r["target"]: r for r in json.loads(out)}
    assert {r["status"] for r in results.values()} == {"skipped"}
    assert results[pg.id]["applied"] == []


@pytest.mark.django_db
def test_skip_at_head_leaves_recorded_targets_unread_and_migrates_the_rest(registered_tenant):
    at_head, behind = registered_tenant("postgresql"), registered_tenant("mysql")
    assert run_command("--tenant", at_head.id, "--sync")[0] == 0
    # Behind the control plane's back (nothing recorded): the recorded head no longer holds.
    from migrator.tasks import migrate

    migrate(at_head.target, kind="downgrade", revision="0004_accounts_display_name")
    runs_before = MigrationRun.objects.count()

    code, out, err = run_command("--all", "--skip-at-head", "--sync", "--json")

    assert code == 0, err
    results = {r["target"]: r for r in json.loads(out)}
    assert results[at_head.id]["status"] == "recorded-at-head"
    assert results[at_head.id]["revision"] == HEAD
    assert results[behind.id]["status"] == "succeeded"
    assert MigrationRun.objects.count() == runs_before + 1  # no run for the one left alone

    # Without the flag every database is read: the change is found and repaired.
    code, out, _ = run_command("--tenant", at_head.id, "--sync", "--json")
    [result] = json.loads(out)
    assert (code, result["status"], len(result["applied"])) == (0, "succeeded", 2)

    code, _, err = run_command("--all", "--skip-at-head", "--sync")
    assert code == 0
    assert "2 target(s) recorded at head: left alone without reading their databases" in err


@pytest.mark.django_db
def test_wait_follows_a_run_already_under_way_until_it_finishes(registered_tenant):
    from migrator.tasks import run_migration

    busy, done = registered_tenant("postgresql"), registered_tenant("postgresql")
    # Somebody else queued both; one of theirs has finished, the other waits for a worker.
    queued, finished = actions.do_enqueue_runs(
        [busy.target, done.target], trigger=Trigger.ADMIN, enqueue=False
    )
    run_migration(finished.run.pk)

    code, out, err = run_command("--tenant", busy.id, "--wait", "--timeout", "1", "--json")

    # The command found the queued run and waited for it, not for the other run of its batch.
    assert "Gave up waiting after 1s" in err
    [result] = json.loads(out)
    assert (result["run"], result["status"]) == (queued.run.pk, "queued")


@pytest.mark.django_db
def test_skip_at_head_is_only_for_an_upgrade_to_head(registered_tenant):
    from django.core.management.base import CommandError

    registered_tenant("postgresql")
    with pytest.raises(CommandError) as excinfo:
        call_command("migrate_tenants", "--all", "--skip-at-head", "--to", "0002_projects")
    assert excinfo.value.returncode == 2
    assert "--skip-at-head is for an upgrade to head only" in str(excinfo.value)


@pytest.mark.django_db
def test_command_usage_errors_exit_2(registered_tenant):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError) as excinfo:
        call_command("migrate_tenants")
    assert excinfo.value.returncode == 2
    with pytest.raises(CommandError) as excinfo:
        call_command("migrate_tenants", "--tenant", "no-such-tenant")
    assert "Unknown tenant id(s): no-such-tenant" in str(excinfo.value)
    assert excinfo.value.returncode == 2


@pytest.mark.django_db
def test_as_user_needs_the_run_migrations_permission(registered_tenant, django_user_model):
    from django.core.management.base import CommandError

    registered_tenant("postgresql")
    django_user_model.objects.create_user("viewer")
    with pytest.raises(CommandError) as excinfo:
        call_command("migrate_tenants", "--all", "--as-user", "viewer")
    assert "lacks the 'tenants.run_migrations' permission" in str(excinfo.value)
    assert not MigrationRun.objects.exists()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_wait_json_through_a_real_worker_cluster(registered_tenant, tmp_path):
    pg = registered_tenant("postgresql")
    my = registered_tenant("mysql")
    broken = registered_tenant("missing-secret")
    env = process_env()
    with qcluster(env, tmp_path / "qcluster.log"):
        result = manage("migrate_tenants", "--all", "--wait", "--json", "--timeout", "90", env=env)
    assert result.returncode == 1, result.stderr
    results = {r["target"]: r for r in json.loads(result.stdout)}
    assert results[pg.id]["status"] == "succeeded"
    assert results[my.id]["status"] == "succeeded"
    assert results[pg.id]["revision_after"] == HEAD
    assert results[broken.id]["status"] == "failed"
    assert "secret/data/database/" in results[broken.id]["error"]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("broker", ["orm", "redis"])
def test_new_tenant_is_migrated_by_the_workers(broker, registered_tenant, request, tmp_path):
    extra = {}
    if broker == "redis":
        extra["REDIS_URL"] = request.getfixturevalue("redis_url")
        extra["Q_CLUSTER_NAME"] = f"test-{tmp_path.name}"[:40]
    env = process_env(**extra)
    # The databases and secrets exist first, as after provisioning; then the tenant is created.
    pg = registered_tenant("postgresql", auto_migrate=False)
    my = registered_tenant("mysql", auto_migrate=False)
    pairs = [(pg, "postgresql"), (my, "mysql")]
    for tenant, _ in pairs:
        Tenant.objects.filter(pk=tenant.pk).delete()  # keep the target and its secret
    script = "; ".join(
        f"Tenant.objects.create(id={t.id!r}, name='x', strategy='dedicated', "
        f"target=MigrationTarget.objects.get(name={t.target.name!r}))"
        for t, _ in pairs
    )
    with qcluster(env, tmp_path / "qcluster.log"):
        created = manage(
            "shell",
            "-c",
            f"from tenants.models import Tenant, MigrationTarget; {script}",
            env=env,
            check=True,
        )
        assert created.returncode == 0
        runs = wait_for_runs(
            MigrationRun.objects.filter(target__name__in=[t.target.name for t, _ in pairs]),
            timeout=90,
        )
    assert len(runs) == 2
    for run in runs:
        assert run.trigger == "signal"
        assert run.status == "succeeded", (run.error, (tmp_path / "qcluster.log").read_text())
        assert run.revision_after == HEAD
        assert run.task_id and run.worker_host
        assert run.target.revision == HEAD
        assert run.target.status == "up_to_date"


@pytest.mark.django_db
def test_signal_queues_after_commit_only_for_own_databases(
    tenant_factory, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        dedicated = tenant_factory(strategy="dedicated", auto_migrate=True)
        tenant_factory(strategy="external", auto_migrate=False)
        tenant_factory(strategy="shared", auto_migrate=True)
    assert len(callbacks) == 1
    [run] = MigrationRun.objects.all()
    assert (run.target_id, run.trigger, run.status) == (dedicated.target_id, "signal", "queued")


@pytest.mark.django_db(transaction=True)
def test_twenty_simultaneous_triggers_start_one_migration(tenant_factory):
    tenant = tenant_factory(auto_migrate=False)
    target = tenant.target
    results, errors = [], []
    barrier = threading.Barrier(20)

    def trigger():
        try:
            barrier.wait()
            [dispatch] = actions.do_enqueue_runs([target], trigger=Trigger.API, enqueue=False)
            results.append((dispatch.run.pk, dispatch.created))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=trigger) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert MigrationRun.objects.filter(target=target).count() == 1
    assert len({run_id for run_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1


# --- the admin --------------------------------------------------------------------------------


@pytest.fixture
def staff(django_user_model, client):
    from django.contrib.auth.models import Permission

    def make(can_run):
        user = django_user_model.objects.create_user("staff", password="pw", is_staff=True)
        user.user_permissions.add(
            *Permission.objects.filter(codename__in=["view_tenant", "change_tenant"])
        )
        if can_run:
            user.user_permissions.add(Permission.objects.get(codename="run_migrations"))
        client.force_login(user)
        return client

    return make


@pytest.mark.django_db
def test_admin_hides_migration_actions_without_the_permission(staff, tenant_factory):
    tenant = tenant_factory(auto_migrate=False)
    client = staff(can_run=False)
    page = client.get(reverse("admin:tenants_tenant_changelist"))
    assert page.status_code == 200
    assert b"migrate_to_head" not in page.content
    client.post(
        reverse("admin:tenants_tenant_changelist"),
        {"action": "migrate_to_head", "_selected_action": [tenant.pk]},
    )
    assert not MigrationRun.objects.exists()


@pytest.mark.django_db
def test_admin_migrate_action_queues_and_reports_each_row(
    staff, tenant_factory, django_capture_on_commit_callbacks
):
    first, second = tenant_factory(auto_migrate=False), tenant_factory(auto_migrate=False)
    client = staff(can_run=True)
    page = client.get(reverse("admin:tenants_tenant_changelist"))
    assert b"migrate_to_head" in page.content
    response = client.post(
        reverse("admin:tenants_tenant_changelist"),
        {"action": "migrate_to_head", "_selected_action": [first.pk, second.pk]},
        follow=True,
    )
    text = response.content.decode()
    assert f"queued for {first.target.name} (head)" in text
    assert f"queued for {second.target.name} (head)" in text
    assert MigrationRun.objects.filter(trigger="admin", triggered_by__username="staff").count() == 2
    # Again while queued: nothing new, and the page says so.
    response = client.post(
        reverse("admin:tenants_tenant_changelist"),
        {"action": "migrate_to_head", "_selected_action": [first.pk]},
        follow=True,
    )
    assert "no second migration was started" in response.content.decode()
    assert MigrationRun.objects.count() == 2


@pytest.mark.django_db
def test_admin_preview_sql_shows_the_sql_without_running_it(staff, tenant_factory):
    tenant = tenant_factory(auto_migrate=False)
    client = staff(can_run=True)
    response = client.post(
        reverse("admin:tenants_tenant_changelist"),
        {"action": "preview_sql", "_selected_action": [tenant.pk]},
    )
    text = response.content.decode()
    assert response.status_code == 200
    assert "CREATE TABLE accounts" in text
    assert tenant.target.name in text
    assert not MigrationRun.objects.exists()


# --- the HTTP API -----------------------------------------------------------------------------


@pytest.fixture
def api_tokens(django_user_model):
    from django.contrib.auth.models import Permission
    from knox.models import AuthToken

    operator = django_user_model.objects.create_user("operator")
    operator.user_permissions.add(Permission.objects.get(codename="run_migrations"))
    nobody = django_user_model.objects.create_user("nobody")
    return {
        "good": AuthToken.objects.create(user=operator)[1],
        "no-permission": AuthToken.objects.create(user=nobody)[1],
    }


@pytest.mark.django_db
def test_api_trigger_and_status(client, api_tokens, tenant_factory):
    tenant = tenant_factory(auto_migrate=False)
    url = f"/api/tenants/{tenant.id}/migrate"

    assert client.post(url).status_code == 401
    assert client.post(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    denied = client.post(url, headers={"Authorization": f"Bearer {api_tokens['no-permission']}"})
    assert denied.status_code == 403
    assert "run_migrations" in denied.json()["detail"]
    assert not MigrationRun.objects.exists()

    auth = {"Authorization": f"Bearer {api_tokens['good']}"}
    response = client.post(url, headers=auth)
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued" and body["created"] is True
    assert body["triggered_by"] == "operator" and body["trigger"] == "api"

    again = client.post(url, headers={"Authorization": f"Token {api_tokens['good']}"})
    assert again.status_code == 202
    assert again.json()["id"] == body["id"] and again.json()["created"] is False

    status = client.get(f"/api/runs/{body['id']}", headers=auth)
    assert status.status_code == 200
    assert status.json()["target"] == tenant.target.name
    assert client.get(f"/api/runs/{body['id']}").status_code == 401
    assert client.post("/api/tenants/nope/migrate", headers=auth).status_code == 404


# --- startup and health -----------------------------------------------------------------------


@pytest.mark.django_db
def test_startup_migrates_shared_database_and_fails_the_start_when_it_fails(
    vault, vault_secret, pg_database, target_factory, settings
):
    import io

    shared = target_factory(name="shared", kind="shared", provider="postgresql")
    settings.MIGRATE_SHARED_ON_STARTUP = True
    err = io.StringIO()
    with pytest.raises(SystemExit) as excinfo:
        call_command("startup_migrations", stdout=io.StringIO(), stderr=err)
    assert excinfo.value.code == 1
    assert "Shared database shared failed to migrate" in err.getvalue()
    assert "secret/data/database/shared" in err.getvalue()

    vault_secret("shared", pg_database().secret())
    out = io.StringIO()
    call_command("startup_migrations", stdout=out, stderr=io.StringIO())
    assert f"Shared database shared is at {HEAD}" in out.getvalue()
    shared.refresh_from_db()
    assert shared.status == "up_to_date"
    assert MigrationRun.objects.filter(trigger="startup").count() == 2


@pytest.mark.django_db(transaction=True)  # the checks run in a thread of their own
def test_health_endpoints(client, target_factory):
    assert client.get("/healthz").json() == {"status": "ok"}
    shared = target_factory(name="shared", kind="shared", status="up_to_date", revision=HEAD)
    target_factory(status="failed")
    ready = client.get("/readyz?format=json")
    assert ready.status_code == 200
    assert ready.json()["targets"]["failed"] == 1
    shared.status = "behind"
    shared.save()
    ready = client.get("/readyz?format=json")
    assert ready.status_code == 500
    assert "1 shared database(s) not at head" in json.dumps(ready.json())
