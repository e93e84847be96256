"""Backups before migration and restores, on real PostgreSQL, MariaDB and SQLite databases with
their secrets in OpenBao: a backup taken before a run gives back the rows and the revision; a
failing backup stops the run before any DDL; passwords never reach a command line or an error;
old backups are deleted; the policy follows the target's kind; SQL Server's statements are
checked offline."""

import hashlib
import io
import os
import re
import stat
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse
from sqlalchemy import create_engine, text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.pool import NullPool

from migrator import backups, process
from migrator.providers import mysql, postgresql, sqlserver
from migrator.secrets import ConnectionInfo
from tenants import actions
from tenants.models import MigrationRun, Trigger
from tests.dispatch_fixtures import HEAD
from tests.test_reliability import migrate_once

pytestmark = [pytest.mark.django_db, pytest.mark.vault]

CANARY = "canary-Pa55:w/o%rd\"#'\\;x"


@pytest.fixture
def backup_dir(settings, tmp_path):
    settings.BACKUP_DIR = str(tmp_path / "backups")
    return tmp_path / "backups"


@pytest.fixture
def commands(monkeypatch):
    """Every command line (and environment) the backups module starts, still run for real."""
    seen = []
    real = subprocess.run

    def spy(argv, *args, **kwargs):
        seen.append((list(argv), dict(kwargs.get("env") or {})))
        return real(argv, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", spy)
    return seen


@pytest.fixture
def sqlite_tenant(vault, vault_secret, tenant_factory, tmp_path):
    """Factory: a dedicated tenant on a SQLite file, its secret in OpenBao."""
    engines = []

    def make(**fields):
        fields.setdefault("auto_migrate", False)
        tenant = tenant_factory(provider="sqlite", **fields)
        path = tmp_path / f"{tenant.id}.sqlite3"
        vault_secret(tenant.target.vault_path, {"provider": "sqlite", "database": str(path)})
        tenant.engine = create_engine(f"sqlite:///{path}", poolclass=NullPool)
        engines.append(tenant.engine)
        return tenant

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def tenant_on(request, sqlite_tenant):
    """Factory: a tenant on ``provider`` ("postgresql", "mysql", "sqlite") with ``.engine``, an
    engine reaching its database as the admin user."""
    engines = []

    def make(provider, **fields):
        if provider == "sqlite":
            return sqlite_tenant(**fields)
        tenant = request.getfixturevalue("registered_tenant")(provider, **fields)
        tenant.engine = create_engine(tenant.database.sqlalchemy_url(), poolclass=NullPool)
        engines.append(tenant.engine)
        return tenant

    yield make
    for engine in engines:
        engine.dispose()


def emails(engine):
    with engine.connect() as connection:
        return sorted(connection.execute(text("SELECT email FROM accounts")).scalars())


def version(engine):
    with engine.connect() as connection:
        return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()


def execute(engine, *statements):
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(text(statement))


def restore(*args, stdin=None):
    """Run ``restore_target``; (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    kwargs = {"stdin": stdin} if stdin is not None else {}
    try:
        call_command("restore_target", *args, stdout=out, stderr=err, **kwargs)
    except CommandError as exc:
        err.write(str(exc))
        return exc.returncode, out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


class Terminal(io.StringIO):
    """What an operator types at a terminal."""

    def isatty(self):
        return True


def with_backup(tenant, revision="0002_projects"):
    """Migrate ``tenant`` to ``revision``, write two accounts, turn backups on and upgrade to
    head: returns that run, which took the backup."""
    target = tenant.target
    assert migrate_once(target, revision=revision).status == "succeeded"
    execute(
        tenant.engine,
        "INSERT INTO accounts (email) VALUES ('ada@example.com')",
        "INSERT INTO accounts (email) VALUES ('grace@example.com')",
    )
    target.backup_policy = "on"
    target.save(update_fields=["backup_policy"])
    run = migrate_once(target)
    assert run.status == "succeeded", run.error
    return run


# --- a backup taken and restored --------------------------------------------------------------


@pytest.mark.parametrize("provider", ["postgresql", "mysql", "sqlite"])
def test_backup_before_the_upgrade_restores_rows_and_revision(provider, tenant_on, backup_dir):
    tenant = tenant_on(provider)
    target = tenant.target
    run = with_backup(tenant)

    assert (run.revision_before, run.revision_after) == ("0002_projects", HEAD)
    backup = Path(run.backup_path)
    assert backup.parent == backup_dir / target.name
    assert re.fullmatch(rf"\d{{8}}T\d{{6}}Z-run{run.pk}\.(dump|sql|sqlite3)", backup.name)
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert stat.S_IMODE(backup.parent.stat().st_mode) == 0o700
    assert run.backup_size == backup.stat().st_size > 0
    assert run.backup_checksum == hashlib.sha256(backup.read_bytes()).hexdigest()
    assert run.backup_duration_ms is not None

    # Data written after the migration, and a table made after the backup.
    execute(
        tenant.engine,
        "DELETE FROM accounts",
        "INSERT INTO accounts (email, full_name) VALUES ('mallory@example.com', 'M')",
        "CREATE TABLE late_table (id INTEGER PRIMARY KEY)",
    )

    code, out, err = restore("--run", str(run.pk), "--yes")

    assert code == 0, err
    assert emails(tenant.engine) == ["ada@example.com", "grace@example.com"]
    assert version(tenant.engine) == "0002_projects"
    columns = {c["name"] for c in sa_inspect(tenant.engine).get_columns("accounts")}
    assert "full_name" not in columns and "display_name" not in columns
    restored = MigrationRun.objects.get(target=target, kind="restore")
    assert restored.status == "succeeded"
    assert restored.restored_from_id == run.pk
    assert (restored.revision_before, restored.revision_after) == (HEAD, "0002_projects")
    target.refresh_from_db()
    assert (target.revision, target.status) == ("0002_projects", "behind")
    assert f"now stands at 0002_projects. Recorded as run #{restored.pk}" in out
    if provider == "sqlite":
        # The whole file was replaced: nothing of after the backup is left.
        assert "late_table" not in sa_inspect(tenant.engine).get_table_names()
    else:
        # pg_restore --clean and a dump drop only what they hold: say what was left.
        assert "late_table" in err and "late_table" in restored.log

    # The restored database migrates again.
    if provider != "sqlite":
        execute(tenant.engine, "DROP TABLE late_table")
    again = migrate_once(target)
    assert again.status == "succeeded" and again.revision_after == HEAD


def test_restore_leaves_the_target_not_verified(sqlite_tenant, backup_dir, admin_client):
    # The fingerprint and drift found on the schema the restore replaced no longer describe
    # the target: the dashboard must not show the restored revision under that fingerprint.
    tenant = sqlite_tenant()
    target = tenant.target
    run = with_backup(tenant)
    target.refresh_from_db()
    old_fingerprint = target.schema_fingerprint
    assert old_fingerprint and target.verified_at is not None
    target.drifted, target.drift_report = True, "Schema at x (sqlite): DRIFTED"
    target.save(update_fields=["drifted", "drift_report"])

    code, _, err = restore("--run", str(run.pk), "--yes")

    assert code == 0, err
    html = admin_client.get(reverse("fleet-dashboard")).content.decode()
    section = html[html.index('id="fleet-fingerprints"') :]
    section = section[: section.index("</table>")]
    assert old_fingerprint[:12] not in section and "drifted" not in section
    [row] = [row for row in section.split("<tr") if "0002_projects" in row]
    assert "not verified" in row
    target.refresh_from_db()
    assert (target.schema_fingerprint, target.verified_at, target.drifted) == ("", None, False)
    page = admin_client.get(
        reverse("admin:tenants_migrationtarget_change", args=[target.pk])
    ).content.decode()
    assert old_fingerprint not in page and "DRIFTED" not in page


def test_backup_holds_the_database_as_it_was_not_a_later_one(sqlite_tenant, backup_dir):
    tenant = sqlite_tenant()
    run = with_backup(tenant)
    restored_copy = create_engine(f"sqlite:///{run.backup_path}", poolclass=NullPool)
    try:
        assert version(restored_copy) == "0002_projects"
        assert emails(restored_copy) == ["ada@example.com", "grace@example.com"]
    finally:
        restored_copy.dispose()


def test_nothing_pending_takes_no_backup_and_a_downgrade_always_does(sqlite_tenant, backup_dir):
    tenant = sqlite_tenant()
    target = tenant.target
    target.backup_policy = "on"
    target.save(update_fields=["backup_policy"])
    assert migrate_once(target).backup_path  # from base to head: backed up
    skipped = migrate_once(target)
    assert skipped.status == "skipped" and skipped.backup_path == ""
    down = migrate_once(target, kind="downgrade", revision="0003_projects_account_name")
    assert down.status == "succeeded", down.error
    assert Path(down.backup_path).is_file() and down.revision_before == HEAD


# --- a failing backup stops the run before any DDL --------------------------------------------


def test_failing_pg_dump_stops_the_run_before_any_ddl(
    registered_tenant, postgres_server, backup_dir, commands
):
    tenant = registered_tenant("postgresql")
    target = tenant.target
    db = tenant.database
    migrate_once(target, revision="0002_projects")
    # A table a DBA made as another role, which the admin user may not read: pg_dump fails.
    with postgres_server.connect(db.database) as conn:
        conn.execute("CREATE TABLE audit_private (id integer)")
    target.backup_policy = "on"
    target.save(update_fields=["backup_policy"])

    run = migrate_once(target)

    assert (run.status, run.error_code, run.retryable) == ("failed", "backup_failed", False)
    assert "pg_dump exited with status 1" in run.error
    assert "permission denied for table audit_private" in run.error
    assert "The run stopped before applying anything" in run.error
    assert run.applied == []
    assert (run.target.revision, run.target.status) == ("0002_projects", "failed")
    engine = create_engine(db.sqlalchemy_url(), poolclass=NullPool)
    try:
        assert version(engine) == "0002_projects"
        assert "ix_projects_account_id_name" not in {
            index["name"] for index in sa_inspect(engine).get_indexes("projects")
        }
    finally:
        engine.dispose()
    assert list((backup_dir / target.name).iterdir()) == []  # no partial file left
    assert db.admin_password not in run.error
    assert commands and all(db.admin_password not in " ".join(argv) for argv, _ in commands)


def fake_tool(directory, name, script):
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)
    return path


def test_pg_dump_older_than_the_server_is_refused_clearly(
    registered_tenant, postgres_server, backup_dir, monkeypatch, tmp_path
):
    fake_tool(tmp_path / "bin", "pg_dump", 'echo "pg_dump (PostgreSQL) 9.6.24"\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    tenant = registered_tenant("postgresql", strategy="external")  # external: backed up
    with postgres_server.connect() as conn:
        server_major = int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10000

    run = migrate_once(tenant.target)

    assert run.error_code == "backup_failed"
    assert "pg_dump at" in run.error and "is version 9.6, older than the PostgreSQL" in run.error
    assert f"postgresql-client-{server_major}" in run.error
    assert run.target.revision == "" and run.applied == []


def test_backup_tool_that_hangs_is_stopped_by_the_task_timeout(
    registered_tenant, backup_dir, monkeypatch, tmp_path, settings
):
    fake_tool(
        tmp_path / "bin",
        "pg_dump",
        'if [ "$1" = "--version" ]; then echo "pg_dump (PostgreSQL) 99.0"; exit 0; fi\n'
        "exec sleep 30\n",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    settings.MIGRATION_TASK_TIMEOUT = 1
    tenant = registered_tenant("postgresql", strategy="external")

    run = migrate_once(tenant.target)

    assert run.error_code == "backup_failed"
    assert "did not finish within 1s (MIGRATION_TASK_TIMEOUT)" in run.error
    assert run.target.revision == ""


def test_backup_dir_that_cannot_be_written_stops_the_run(registered_tenant, settings, tmp_path):
    not_a_directory = tmp_path / "backups"
    not_a_directory.write_text("a file where the backup directory should be")
    settings.BACKUP_DIR = str(not_a_directory)
    tenant = registered_tenant("mysql", strategy="external")

    run = migrate_once(tenant.target)

    assert run.error_code == "backup_failed"
    assert f"Cannot write the backup of {tenant.target.name}" in run.error
    assert "BACKUP_DIR" in run.error and "free space" in run.error
    assert run.target.revision == "" and run.applied == []
    engine = create_engine(tenant.database.sqlalchemy_url(), poolclass=NullPool)
    try:
        assert sa_inspect(engine).get_table_names() == []  # not even alembic_version
    finally:
        engine.dispose()


# --- passwords --------------------------------------------------------------------------------


def canary_connection(provider, **changes):
    fields = {
        "provider": provider,
        "host": "db.internal",
        "port": 5432 if provider == "postgresql" else 3306,
        "database": "tenant_db",
        "username": "tenant_admin",
        "password": CANARY,
        "options": {"sslmode": "require", "password": CANARY},
    }
    fields.update(changes)
    return ConnectionInfo(**fields)


def test_command_lines_never_hold_the_password():
    pg = canary_connection("postgresql")
    my = canary_connection("mysql")
    argvs = [
        postgresql.pg_dump_command(pg),
        postgresql.pg_restore_command(pg, "/backups/x.dump"),
        mysql.mysqldump_command(my, "/tmp/private/client.cnf"),
        mysql.mysql_restore_command(my, "/tmp/private/client.cnf"),
    ]
    for argv in argvs:
        assert CANARY not in " ".join(argv)
        assert not any(re.match(r"(--password|-p)(=|$)", part) for part in argv)
        assert not any("password=" in part for part in argv)
    assert "sslmode='require'" in postgresql.pg_conninfo(pg)
    assert postgresql.pg_environment(pg)["PGPASSWORD"] == CANARY
    assert argvs[2][1] == "--defaults-extra-file=/tmp/private/client.cnf"  # must come first


def test_mysql_option_file_is_private_escaped_and_removed():
    info = canary_connection("mysql")
    with mysql.mysql_option_file(info) as path:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        content = Path(path).read_text()
    assert content == '[client]\npassword="canary-Pa55:w/o%rd\\"#\'\\\\;x"\n'
    assert not os.path.exists(path) and not os.path.exists(os.path.dirname(path))


def test_odd_mysql_password_backs_up_and_restores_through_the_option_file(
    tenant_on, mysql_server, vault_secret, backup_dir, commands
):
    tenant = tenant_on("mysql")
    db = tenant.database
    odd = "we\"ird#pa\\ss;'wo rd%"
    conn = mysql_server.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"ALTER USER '{db.admin_username}'@'%%' IDENTIFIED BY %s", (odd,))
    finally:
        conn.close()
    db.admin_password = odd
    vault_secret(tenant.target.vault_path, db.secret())
    tenant.engine.dispose()
    tenant.engine = create_engine(db.sqlalchemy_url(), poolclass=NullPool)
    try:
        run = with_backup(tenant)
        execute(tenant.engine, "DELETE FROM accounts")
        code, _, err = restore("--run", str(run.pk), "--yes")
        assert code == 0, err
        assert emails(tenant.engine) == ["ada@example.com", "grace@example.com"]
    finally:
        tenant.engine.dispose()
    tools = {Path(argv[0]).name for argv, _ in commands}
    assert {"mysqldump", "mysql"} <= tools
    for argv, env in commands:
        assert odd not in " ".join(argv)
        assert "MYSQL_PWD" not in env


# --- retention --------------------------------------------------------------------------------


def test_retention_keeps_the_newest_backups_per_target(sqlite_tenant, backup_dir, settings):
    settings.BACKUP_RETENTION = 2
    tenant = sqlite_tenant()
    target = tenant.target
    target.backup_policy = "on"
    target.save(update_fields=["backup_policy"])
    runs = [
        migrate_once(target, revision=revision)
        for revision in ("0001_accounts", "0002_projects", "0003_projects_account_name")
    ]
    assert all(run.backup_path for run in runs)
    kept = sorted(path.name for path in (backup_dir / target.name).iterdir())
    assert kept == sorted(Path(run.backup_path).name for run in runs[1:])

    code, _, err = restore("--run", str(runs[0].pk), "--yes")
    assert code == 1
    assert "no longer exists" in err and "BACKUP_RETENTION=2" in err
    assert not MigrationRun.objects.filter(kind="restore").exists()


def test_retention_orders_by_time_then_run_and_leaves_other_files(tmp_path):
    names = [
        "20250101T000000Z-run9.dump",
        "20250101T000000Z-run10.dump",
        "20241231T235959Z-run11.dump",
        "20250102T000000Z-run3.dump",
    ]
    for name in [*names, "notes.txt", "20250103T000000Z-run12.dump.partial"]:
        (tmp_path / name).write_text("x")
    deleted = backups.apply_retention(tmp_path, 2)
    assert sorted(path.name for path in deleted) == [
        "20241231T235959Z-run11.dump",
        "20250101T000000Z-run9.dump",
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "20250101T000000Z-run10.dump",
        "20250102T000000Z-run3.dump",
        "20250103T000000Z-run12.dump.partial",
        "notes.txt",
    ]
    assert backups.apply_retention(tmp_path, 0) == []  # below 1: keep everything


# --- policy -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "policy", "expected"),
    [
        ("shared", "inherit", False),
        ("dedicated", "inherit", False),
        ("external", "inherit", True),
        ("shared", "on", True),
        ("dedicated", "on", True),
        ("external", "off", False),
        ("dedicated", "off", False),
    ],
)
def test_policy_by_kind_overridden_per_target(kind, policy, expected):
    assert backups.required(policy, kind) is expected


def test_policy_setting_per_kind(settings):
    settings.BACKUP_BEFORE_MIGRATION_SHARED = True
    settings.BACKUP_BEFORE_MIGRATION_EXTERNAL = False
    assert backups.required("inherit", "shared")
    assert not backups.required("inherit", "external")
    assert backups.required("on", "external")


def test_external_targets_are_backed_up_by_default_dedicated_ones_are_not(
    registered_tenant, backup_dir
):
    external = migrate_once(registered_tenant("postgresql", strategy="external").target)
    dedicated = migrate_once(registered_tenant("postgresql").target)
    assert external.status == dedicated.status == "succeeded"
    assert Path(external.backup_path).is_file() and external.backup_checksum
    assert dedicated.backup_path == "" and dedicated.backup_checksum == ""


# --- restore_target refuses -------------------------------------------------------------------


def test_restore_refuses_an_altered_backup(sqlite_tenant, backup_dir):
    tenant = sqlite_tenant()
    run = with_backup(tenant)
    with open(run.backup_path, "ab") as file:
        file.write(b"tampered")
    code, _, err = restore("--run", str(run.pk), "--yes")
    assert code == 1
    assert "was altered since it was written" in err and run.backup_checksum in err
    assert not MigrationRun.objects.filter(kind="restore").exists()
    assert version(tenant.engine) == HEAD


def test_restore_asks_for_the_target_name(sqlite_tenant, backup_dir):
    tenant = sqlite_tenant()
    run = with_backup(tenant)
    name = tenant.target.name

    code, _, err = restore("--run", str(run.pk), stdin=io.StringIO(name + "\n"))
    assert code == 2 and "pass --yes" in err  # not a terminal: never restores unasked

    code, _, err = restore("--run", str(run.pk), stdin=Terminal("somebody-else\n"))
    assert code == 2 and "did not match; nothing was restored" in err
    assert not MigrationRun.objects.filter(kind="restore").exists()
    assert version(tenant.engine) == HEAD

    code, _, err = restore("--run", str(run.pk), stdin=Terminal(name + "\n"))
    assert code == 0, err
    assert f"Type the target's name ({name})" in err
    assert version(tenant.engine) == "0002_projects"


def test_restore_refuses_while_the_target_has_an_active_run(sqlite_tenant, backup_dir):
    tenant = sqlite_tenant()
    run = with_backup(tenant)
    [queued] = actions.do_enqueue_runs([tenant.target], trigger=Trigger.COMMAND, enqueue=False)

    code, _, err = restore("--run", str(run.pk), "--yes")

    assert code == 1
    assert f"has run #{queued.run.pk} queued" in err and "Nothing was restored" in err
    assert not MigrationRun.objects.filter(kind="restore").exists()
    assert version(tenant.engine) == HEAD


def test_a_held_target_is_restored_and_stays_held(sqlite_tenant, backup_dir):
    # Holding a target keeps migrations off it, not the operator's restore.
    tenant = sqlite_tenant()
    run = with_backup(tenant)
    actions.do_set_held(tenant.target, held=True)

    code, _, err = restore("--run", str(run.pk), "--yes")

    assert code == 0, err
    assert emails(tenant.engine) == ["ada@example.com", "grace@example.com"]
    assert version(tenant.engine) == "0002_projects"
    assert MigrationRun.objects.get(kind="restore").status == "succeeded"
    tenant.target.refresh_from_db()
    assert (tenant.target.revision, tenant.target.held, tenant.target.status) == (
        "0002_projects",
        True,
        "held",
    )


def test_restore_needs_a_run_with_a_backup(sqlite_tenant, backup_dir):
    tenant = sqlite_tenant()
    plain = migrate_once(tenant.target)
    code, _, err = restore("--run", str(plain.pk), "--yes")
    assert code == 2 and "took no backup" in err
    code, _, err = restore("--run", "999999", "--yes")
    assert code == 2 and "There is no run #999999" in err


def test_failed_restore_is_recorded_on_a_restore_run(sqlite_tenant, backup_dir, vault_secret):
    tenant = sqlite_tenant()
    run = with_backup(tenant)
    # The secret now points to a database in a directory that does not exist.
    vault_secret(
        tenant.target.vault_path, {"provider": "sqlite", "database": "/nonexistent/dir/t.db"}
    )
    process.reset()  # a worker that has not read the secret yet

    code, _, err = restore("--run", str(run.pk), "--yes")

    assert code == 1
    failed = MigrationRun.objects.get(kind="restore")
    assert failed.status == "failed" and failed.error_code == "database_unreachable"
    assert f"Restore run #{failed.pk} of {tenant.target.name} failed" in err
    failed.target.refresh_from_db()
    assert failed.target.status == "failed"


# --- SQL Server, offline -----------------------------------------------------------------------


def test_sql_server_backup_statement():
    assert sqlserver.mssql_backup_statement(
        "tenant_db", "/var/opt/mssql/backup/acme-20250106T091500Z-run17.bak"
    ) == (
        "BACKUP DATABASE [tenant_db] TO DISK = "
        "N'/var/opt/mssql/backup/acme-20250106T091500Z-run17.bak' WITH COPY_ONLY, INIT, CHECKSUM"
    )


def test_sql_server_statements_quote_what_they_name():
    evil = "x]; DROP DATABASE master; --"
    statement = sqlserver.mssql_backup_statement(evil, "/b/o'brien'; DROP TABLE t; --.bak")
    assert statement == (
        "BACKUP DATABASE [x]]; DROP DATABASE master; --] TO DISK = "
        "N'/b/o''brien''; DROP TABLE t; --.bak' WITH COPY_ONLY, INIT, CHECKSUM"
    )
    with pytest.raises(ValueError):
        sqlserver.quote("a\x00b")


def test_sql_server_restore_statements():
    assert sqlserver.mssql_restore_statements("tenant_db", "/backup/t.bak") == [
        "RESTORE VERIFYONLY FROM DISK = N'/backup/t.bak' WITH CHECKSUM",
        "ALTER DATABASE [tenant_db] SET SINGLE_USER WITH ROLLBACK IMMEDIATE",
        "RESTORE DATABASE [tenant_db] FROM DISK = N'/backup/t.bak' WITH REPLACE, CHECKSUM",
        "ALTER DATABASE [tenant_db] SET MULTI_USER",
    ]


def test_sql_server_backup_path_on_the_server(settings):
    now = datetime(2025, 1, 6, 9, 15, tzinfo=UTC)
    settings.MSSQL_BACKUP_DIR = "/var/opt/mssql/backup/"
    assert (
        sqlserver.mssql_backup_path("acme", 17, now=now)
        == "/var/opt/mssql/backup/acme-20250106T091500Z-run17.bak"
    )
    settings.MSSQL_BACKUP_DIR = "D:\\Backups"
    assert (
        sqlserver.mssql_backup_path("acme", 17, now=now)
        == "D:\\Backups\\acme-20250106T091500Z-run17.bak"
    )


def test_pg_dump_version_parsing():
    parse = postgresql.parse_pg_version
    assert parse("pg_dump (PostgreSQL) 15.20 (Debian 15.20-0+deb12u1)") == (15,)
    assert parse("pg_dump (PostgreSQL) 9.6.24") == (9, 6)
    assert parse("no version here") is None
