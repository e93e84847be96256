"""Edges of the record and of the pipeline (issues 16 and 17): what the record says must be what
the databases are, and a migration must never block the application for long. Each test drives
the real path (a command, the admin, the API, a run on a real database, real OpenBao)."""

import io

import pytest
from django.core.management import call_command

from migrator import runner
from migrator.tasks import run_migration
from tenants import actions
from tenants.models import MigrationTarget, Trigger
from tests.dispatch_fixtures import HEAD

pytestmark = [pytest.mark.django_db, pytest.mark.vault]


def migrate_once(target, **kwargs):
    """Queue one run for ``target`` and execute it here; return the run as recorded."""
    kwargs.setdefault("trigger", Trigger.COMMAND)
    [dispatch] = actions.do_enqueue_runs([target], enqueue=False, **kwargs)
    run_migration(dispatch.run.pk)
    dispatch.run.refresh_from_db()
    dispatch.run.target.refresh_from_db()
    return dispatch.run


# --- a blank Vault path ------------------------------------------------------------------------


def test_blank_vault_path_means_the_same_path_for_vault_check_and_for_a_run(registered_tenant):
    tenant = registered_tenant("postgresql")
    # save() fills a blank path in, but loaddata, bulk_create and QuerySet.update do not.
    MigrationTarget.objects.filter(pk=tenant.target_id).update(vault_path="")
    target = MigrationTarget.objects.get(pk=tenant.target_id)
    assert target.vault_path == "" and target.effective_vault_path == target.name

    out = io.StringIO()
    call_command("vault_check", "--target", target.name, stdout=out)
    assert f"OK    {target.name}: secret/data/database/{target.name}" in out.getvalue()

    run = migrate_once(target)
    assert run.status == "succeeded", run.error
    assert run.target.revision == HEAD


# --- held targets ------------------------------------------------------------------------------


def _set_held_in_admin(client, target, held):
    """Tick or clear *Held* on the target's admin page and save, as an operator does."""
    from django.urls import reverse

    url = reverse("admin:tenants_migrationtarget_change", args=[target.pk])
    form = {
        "name": target.name,
        "kind": target.kind,
        "provider": target.provider,
        "region": target.region,
        "vault_path": target.vault_path,
        "backup_policy": target.backup_policy,
    }
    if held:
        form["held"] = "on"
    response = client.post(url, form)
    assert response.status_code == 302, response.content.decode()[:2000]
    target.refresh_from_db()
    return target


def _held_tile(client):
    import re

    html = client.get("/admin/fleet/").content.decode()
    match = re.search(r'fleet-tile held[^"]*"[^>]*><span class="n">(\d+)</span>Held', html)
    assert match, "no Held tile on the dashboard"
    return int(match.group(1))


@pytest.mark.django_db(transaction=True)  # /readyz runs its checks in a thread of their own
def test_holding_a_target_in_the_admin_shows_as_held_and_releasing_restores_its_status(
    registered_tenant, admin_client, target_factory
):
    tenant = registered_tenant("postgresql")
    assert migrate_once(tenant.target).status == "succeeded"
    target = MigrationTarget.objects.get(pk=tenant.target_id)
    assert target.status == "up_to_date"
    assert _held_tile(admin_client) == 0

    target = _set_held_in_admin(admin_client, target, True)
    assert (target.held, target.status) == (True, "held")
    assert _held_tile(admin_client) == 1
    assert admin_client.get("/readyz?format=json").json()["targets"]["held"] == 1
    [dispatch] = actions.do_enqueue_runs([target], trigger=Trigger.COMMAND, enqueue=False)
    assert dispatch.run is None and "held" in dispatch.message

    target = _set_held_in_admin(admin_client, target, False)
    assert (target.held, target.status) == (False, "up_to_date")
    assert _held_tile(admin_client) == 0
    assert admin_client.get("/readyz?format=json").json()["targets"]["held"] == 0


def test_a_target_held_while_its_run_is_queued_is_not_migrated(registered_tenant, admin_client):
    tenant = registered_tenant("postgresql")
    [dispatch] = actions.do_enqueue_runs([tenant.target], trigger=Trigger.COMMAND, enqueue=False)
    assert dispatch.run.status == "queued"
    _set_held_in_admin(admin_client, tenant.target, True)

    assert run_migration(dispatch.run.pk)["status"] == "not-queued"
    run = dispatch.run
    run.refresh_from_db()
    assert run.status == "cancelled"
    assert "held before the run started" in run.error and "nothing ran" in run.error
    target = MigrationTarget.objects.get(pk=tenant.target_id)
    assert (target.status, target.revision) == ("held", "")
    assert runner.current(_target_of(target)).revision is None  # the database was not touched


@pytest.fixture(params=["update-returning", "sqlite-before-3.35"])
def control_plane(request, monkeypatch):
    """The control-plane database as it is, and as a SQLite older than 3.35 would be (no
    UPDATE ... RETURNING: the start goes through the ORM's statements)."""
    from django.db import connection

    if request.param == "sqlite-before-3.35":
        if connection.vendor != "sqlite":
            pytest.skip("a SQLite control plane only")
        monkeypatch.setattr(type(connection.features), "can_return_rows_from_bulk_insert", False)
    return request.param


@pytest.mark.django_db
def test_the_start_takes_only_queued_runs_and_keeps_migrations_off_held_targets(
    control_plane, target_factory
):
    from tenants.models import MigrationRun

    free, held, restored = (target_factory(name=f"start-{n}") for n in range(3))
    dispatches = actions.do_enqueue_runs([free, held], trigger=Trigger.COMMAND, enqueue=False)
    run, stopped = (dispatch.run for dispatch in dispatches)
    restore = MigrationRun.objects.create(target=restored, kind="restore", trigger="command")
    for target in (held, restored):
        actions.do_set_held(target, held=True)

    started = actions.do_start_run(run.pk, worker_host="worker-1:7")
    assert (started.status, started.worker_host, started.target.status) == (
        "running",
        "worker-1:7",
        "migrating",
    )
    assert started.started_at == started.heartbeat_at is not None
    assert MigrationTarget.objects.get(pk=free.pk).status == "migrating"
    # A second worker given the same run does nothing.
    assert actions.do_start_run(run.pk, worker_host="worker-2:7") is None
    run.refresh_from_db()
    assert (run.status, run.worker_host, run.started_at) == (
        "running",
        "worker-1:7",
        started.started_at,
    )

    assert actions.do_start_run(stopped.pk, worker_host="worker-1:7") is None
    stopped.refresh_from_db()
    assert (stopped.status, stopped.error) == ("cancelled", actions.HELD_BEFORE_START)
    assert MigrationTarget.objects.get(pk=held.pk).status == "held"

    # Holding keeps migrations off a target, not the operator's restore: it runs, held.
    started = actions.do_start_run(restore.pk, worker_host="worker-1:7")
    assert (started.status, started.kind, started.target.status) == ("running", "restore", "held")
    assert MigrationTarget.objects.get(pk=restored.pk).status == "held"


def _target_of(record):
    from migrator.secrets import get_secrets_manager
    from migrator.targets import Target

    return Target(
        record.name,
        get_secrets_manager().migration_credentials(
            record.effective_vault_path, provider=record.provider
        ),
    )


# --- a migration waiting for a lock that the application holds --------------------------------


@pytest.mark.mysql
def test_mysql_migration_waiting_for_a_metadata_lock_gives_up_and_the_application_goes_on(
    registered_tenant, mysql_server, settings
):
    import threading
    import time

    import pymysql

    settings.MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT = 2
    tenant = registered_tenant("mysql")
    db = tenant.database
    assert migrate_once(tenant.target, revision="0003_projects_account_name").status == "succeeded"

    def app_connection():
        return pymysql.connect(
            host=mysql_server.host,
            port=mysql_server.port,
            user=mysql_server.user,
            password=mysql_server.password,
            database=db.database,
            read_timeout=120,
        )

    # The application: a transaction that read `accounts` and stays open (its metadata lock too).
    app = app_connection()
    app.cursor().execute("BEGIN")
    app.cursor().execute("SELECT count(*) FROM accounts")
    # Without a bound the ALTER TABLE of 0004 would wait a day: end that transaction after a
    # minute, so the test fails instead of hanging.
    admin = mysql_server.connect()
    watchdog = threading.Timer(60, lambda: admin.cursor().execute(f"KILL {app.thread_id()}"))
    watchdog.start()

    # Another application query on the table while the migration waits: it queues behind the
    # ALTER's pending lock, and goes on once the migration gave up.
    other = {}

    def query_while_the_migration_waits():
        deadline = time.monotonic() + 30
        probe = mysql_server.connect()
        while time.monotonic() < deadline:
            with probe.cursor() as cur:
                cur.execute(
                    "SELECT count(*) FROM information_schema.PROCESSLIST "
                    "WHERE STATE LIKE 'Waiting for table metadata lock' AND DB = %s",
                    (db.database,),
                )
                if cur.fetchone()[0]:
                    break
            time.sleep(0.05)
        probe.close()
        conn = app_connection()
        started = time.monotonic()
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM accounts")
            other["rows"] = cur.fetchone()[0]
        other["seconds"] = time.monotonic() - started
        conn.close()

    thread = threading.Thread(target=query_while_the_migration_waits)
    thread.start()
    started = time.monotonic()
    try:
        run = migrate_once(tenant.target)
        elapsed = time.monotonic() - started
        thread.join(90)
    finally:
        watchdog.cancel()
        admin.close()
    assert other.get("rows") == 0 and other["seconds"] < 30

    assert run.status == "failed" and elapsed < 30
    assert run.error_code == "lock_timeout" and run.retryable is True
    assert (
        "0004_accounts_display_name on "
        f"{tenant.target.name} waited 2 s for a metadata lock on table `accounts` held by another "
        "session (an open application transaction?)"
    ) in run.error
    assert "MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT" in run.error
    target = MigrationTarget.objects.get(pk=tenant.target_id)
    assert (target.revision, target.status) == ("0003_projects_account_name", "behind")

    # The application's transaction ends: the retry goes through.
    app.rollback()
    app.close()
    retry = tenant.target.runs.get(attempt=2, status="queued")
    run_migration(retry.pk)
    retry.refresh_from_db()
    assert retry.status == "succeeded", retry.error
    assert retry.revision_after == HEAD


def test_postgresql_lock_timeout_names_the_other_session_and_is_retried(
    registered_tenant, settings
):
    import psycopg

    settings.MIGRATION_PG_LOCK_TIMEOUT = "1s"
    tenant = registered_tenant("postgresql")
    db = tenant.database
    assert migrate_once(tenant.target, revision="0003_projects_account_name").status == "succeeded"
    app = psycopg.connect(host=db.host, port=db.port, user="postgres", dbname=db.database)
    app.execute("SELECT count(*) FROM accounts")  # psycopg opened a transaction: it stays open
    try:
        run = migrate_once(tenant.target)
    finally:
        app.close()
    assert run.error_code == "lock_timeout" and run.retryable is True
    assert (
        f"0004_accounts_display_name on {tenant.target.name} waited 1s for a lock on table "
        "`accounts` held by another session (an open application transaction?)"
    ) in run.error
    assert "nothing of 0004_accounts_display_name was kept" in run.error
    assert "Fix the revision" not in run.error
    retry = tenant.target.runs.get(attempt=2, status="queued")
    run_migration(retry.pk)
    retry.refresh_from_db()
    assert retry.status == "succeeded" and retry.revision_after == HEAD


@pytest.mark.mysql
def test_mariadb_session_gets_the_lock_wait_and_statement_bounds(
    mysql_database, target_for, settings, tmp_path
):
    from pathlib import Path

    from sqlalchemy import text

    from migrator import engines

    settings.MIGRATION_MYSQL_LOCK_WAIT_TIMEOUT = 7
    settings.MIGRATION_MYSQL_STATEMENT_TIMEOUT = 120
    target = target_for(mysql_database())
    # One revision that keeps the session's bounds, as they are while it runs, in a table.
    env = Path(__file__).resolve().parent.parent / "tenant_migrations" / "env.py"
    scripts = tmp_path / "recording"
    (scripts / "versions").mkdir(parents=True)
    (scripts / "env.py").write_text(f"import runpy\nrunpy.run_path({str(env)!r})\n")
    record = (
        '    op.execute("CREATE TABLE seen AS SELECT @@session.lock_wait_timeout AS lwt, "\n'
        '               "@@session.max_statement_time AS mst")'
    )
    (scripts / "versions" / "s001.py").write_text(
        REVISION.format(revision="s001", down=None, body=record)
    )

    result = runner.upgrade(target, script_location=str(scripts))

    # The revision ran under these bounds.
    assert result.applied == ["s001"]
    with engines.connect(target) as connection:
        lwt, mst = connection.execute(text("SELECT lwt, mst FROM seen")).one()
    assert (int(lwt), float(mst)) == (7, 120.0)


# --- the whole error, not its first line ------------------------------------------------------

REVISION = """
import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = {down!r}
branch_labels = None
depends_on = None


def upgrade() -> None:
{body}


def downgrade() -> None:
    pass
"""


def _script_directory(path, second_upgrade):
    """An Alembic directory: d001 makes `sites` with two rows named site_name; d002 is
    ``second_upgrade`` (the body of its upgrade())."""
    from pathlib import Path

    env = Path(__file__).resolve().parent.parent / "tenant_migrations" / "env.py"
    (path / "versions").mkdir(parents=True)
    (path / "env.py").write_text(f"import runpy\nrunpy.run_path({str(env)!r})\n")
    first = (
        '    op.create_table("sites", sa.Column("id", sa.Integer(), primary_key=True), '
        'sa.Column("name", sa.String(50)))\n'
        "    op.execute(\"INSERT INTO sites (id, name) VALUES (1, 'site_name'), (2, 'site_name')\")"
    )
    for revision, down, body in (("d001", None, first), ("d002", "d001", second_upgrade)):
        (path / "versions" / f"{revision}.py").write_text(
            REVISION.format(revision=revision, down=down, body=body)
        )
    return str(path)


def _whole_error_is_everywhere(run, details, client, admin_client, caplog):
    """The run's error keeps ``details`` after its first line, as do the API's run JSON, the
    admin's run page and the worker's log; lists (the dashboard) show the first line."""
    from django.contrib.auth.models import Permission, User
    from knox.models import AuthToken

    assert run.status == "failed"
    summary = run.error.split("\n", 1)[0]
    assert "d002" in summary and all(line not in summary for line in details)
    assert all(line in run.error for line in details)
    assert run.error_summary == summary

    operator = User.objects.create_user("reader")
    operator.user_permissions.add(Permission.objects.get(codename="run_migrations"))
    token = AuthToken.objects.create(user=operator)[1]
    body = client.get(f"/api/runs/{run.pk}", headers={"Authorization": f"Bearer {token}"}).json()
    assert body["error"] == run.error and body["error_summary"] == summary

    page = admin_client.get(f"/admin/tenants/migrationrun/{run.pk}/change/").content.decode()
    from html import unescape

    assert all(line in unescape(page) for line in details)
    assert all(line in caplog.text for line in details)  # the worker's log

    fleet = unescape(admin_client.get("/admin/fleet/").content.decode())
    assert summary[:200] in fleet and details[0] not in fleet


def test_postgresql_detail_is_kept_on_the_run_the_api_the_admin_and_the_log(
    registered_tenant, settings, tmp_path, client, admin_client, caplog
):
    settings.TENANT_MIGRATIONS_DIR = _script_directory(
        tmp_path / "scripts", '    op.create_index("ix_sites_name", "sites", ["name"], unique=True)'
    )
    tenant = registered_tenant("postgresql")
    with caplog.at_level("INFO"):
        run = migrate_once(tenant.target)
    assert run.error_code == "migration_failed"
    assert 'could not create unique index "ix_sites_name"' in run.error_summary
    _whole_error_is_everywhere(
        run, ["DETAIL: Key (name)=(site_name) is duplicated."], client, admin_client, caplog
    )
    assert run.target.last_error == run.error


def test_a_revisions_multi_line_message_is_kept_whole(
    registered_tenant, settings, tmp_path, client, admin_client, caplog
):
    rows = ["  - site 1: site_name", "  - site 2: site_name", "Rename one of them, then run again."]
    message = "2 sites share a name:\n" + "\n".join(rows)
    settings.TENANT_MIGRATIONS_DIR = _script_directory(
        tmp_path / "scripts", f"    raise ValueError({message!r})"
    )
    tenant = registered_tenant("mysql")
    with caplog.at_level("INFO"):
        run = migrate_once(tenant.target)
    assert "ValueError: 2 sites share a name:" in run.error_summary
    _whole_error_is_everywhere(run, [row.strip() for row in rows], client, admin_client, caplog)


def test_a_runaway_error_is_bounded_on_the_run(registered_tenant, settings, tmp_path):
    settings.TENANT_MIGRATIONS_DIR = _script_directory(
        tmp_path / "scripts",
        '    raise ValueError("too many rows:\\n" + "\\n".join(["row"] * 5000))',
    )
    tenant = registered_tenant("postgresql")
    run = migrate_once(tenant.target)
    assert run.error_summary.startswith("Applying revision d002")
    assert len(run.error) <= actions.ERROR_LIMIT
    assert "more characters" in run.error


# --- Vault at the edges ------------------------------------------------------------------------


@pytest.fixture
def dripping_vault():
    """A local HTTP server that answers every request a byte every 0.2 s (for 40 s at most),
    like a sick proxy in front of Vault; yields its address."""
    import socket
    import threading
    import time

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def answer(conn):
        with conn:
            conn.settimeout(5)
            request = b""
            while b"\r\n\r\n" not in request:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                request += chunk
            body = b'{"data": {}}' + b" " * 1000
            answer = (
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            ends = time.monotonic() + 40
            for byte in answer:
                if stop.is_set() or time.monotonic() > ends:
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return
                time.sleep(0.2)

    def serve():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    server.join(5)
    listener.close()


def test_a_vault_that_drips_bytes_fails_the_run_within_vault_timeout(
    registered_tenant, dripping_vault, settings
):
    import time

    tenant = registered_tenant("postgresql")
    settings.VAULT_ADDR, settings.VAULT_TIMEOUT = dripping_vault, 2
    started = time.monotonic()
    run = migrate_once(tenant.target)
    elapsed = time.monotonic() - started
    assert run.error_code == "vault_unavailable" and run.retryable is True
    assert f"Vault at {dripping_vault}" in run.error
    assert "did not send its whole answer within 2s" in run.error
    assert elapsed < 15


def test_a_kv_version_1_mount_says_so(registered_tenant, openbao, settings):
    import uuid

    tenant = registered_tenant("postgresql")
    client = openbao.client()
    mount = f"kv1-{uuid.uuid4().hex[:8]}"
    client.sys.enable_secrets_engine("kv", path=mount, options={"version": "1"})
    try:
        client.secrets.kv.v1.create_or_update_secret(
            path=f"database/{tenant.target.vault_path}",
            secret=tenant.database.secret(),
            mount_point=mount,
        )
        settings.VAULT_MOUNT_POINT = mount
        run = migrate_once(tenant.target)
        out = io.StringIO()
        with pytest.raises(Exception, match="1 of 1 targets not OK"):
            call_command("vault_check", "--target", tenant.target.name, stdout=out)
    finally:
        client.sys.disable_secrets_engine(mount)
    assert run.error_code == "vault_mount_not_kv2" and run.retryable is False
    assert f"The secrets engine at {mount}/ in Vault" in run.error and "KV version 1" in run.error
    assert "vault kv put" not in run.error
    assert "KV version 1" in out.getvalue()


def test_a_database_that_does_not_exist_is_named_and_not_retried(registered_tenant, vault_secret):
    tenant = registered_tenant("postgresql")
    path = tenant.target.vault_path
    vault_secret(path, tenant.database.secret(database="no_such_database"))
    run = migrate_once(tenant.target)
    assert run.error_code == "database_not_found" and run.retryable is False
    assert "The database 'no_such_database' of" in run.error and "does not exist" in run.error
    assert f"secret/data/database/{path}" in run.error
    assert not tenant.target.runs.filter(attempt=2).exists()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_a_worker_cluster_does_not_migrate_a_target_held_after_its_run_was_queued(
    registered_tenant, admin_client, tmp_path
):
    from tests.workers import manage, process_env, qcluster, wait_for_runs

    tenant = registered_tenant("postgresql")
    env = process_env()
    # Queued through the command while no worker runs: the run waits in the queue.
    queued = manage("migrate_tenants", "--target", tenant.target.name, env=env, check=True)
    assert "queued" in queued.stdout
    _set_held_in_admin(admin_client, tenant.target, True)

    log = tmp_path / "qcluster.log"
    with qcluster(env, log):
        [run] = wait_for_runs(tenant.target.runs.all(), timeout=90)
    assert run.status == "cancelled", (run.status, run.error, log.read_text()[-3000:])
    assert run.error.startswith("The target was held before the run started; nothing ran.")
    target = MigrationTarget.objects.get(pk=tenant.target_id)
    assert (target.status, target.revision) == ("held", "")
    assert runner.current(_target_of(target)).revision is None
