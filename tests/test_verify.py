"""Schema verification on real databases: after an upgrade, on a schedule, on demand.

Each tenant database is a real PostgreSQL or MariaDB database (or a SQLite file) whose
credentials are in the session's OpenBao; references are built on scratch databases of the same
local servers. docs/verification.md describes what is compared and reported.
"""

import io
import json
import sqlite3
from pathlib import Path

import pytest
from django.core.management import call_command
from django.urls import reverse
from sqlalchemy import event
from sqlalchemy.engine import Engine

from migrator import process, verify
from migrator.tasks import check_fleet_for_drift
from tenants.apps import DRIFT_SCHEDULE, ensure_schedules
from tenants.models import MigrationRun, RunKind, TargetStatus
from tests import services
from tests.dispatch_fixtures import HEAD
from tests.test_reliability import migrate_once

pytestmark = [pytest.mark.django_db, pytest.mark.vault, pytest.mark.postgres, pytest.mark.mysql]

PROVIDERS = ["postgresql", "mysql"]
APP_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"


@pytest.fixture(autouse=True)
def verifying(settings, tmp_path):
    """Verification on, references built on the local test servers, cached under tmp_path."""
    settings.VERIFY_AFTER_UPGRADE = True
    settings.VERIFY_SCRATCH_POSTGRES_URL = services.TEST_POSTGRES_URL
    settings.VERIFY_SCRATCH_MYSQL_URL = services.TEST_MYSQL_URL
    settings.DATA_DIR = tmp_path / "data"
    return settings


def execute(db, *statements):
    """Run statements on a tenant database as the server's superuser (an operator by hand)."""
    if db.provider == "postgresql":
        with services.PostgresServer(services.TEST_POSTGRES_URL).connect(db.database) as conn:
            for statement in statements:
                conn.execute(statement)
        return
    conn = services.MySQLServer(services.TEST_MYSQL_URL).connect(db.database)
    try:
        with conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
    finally:
        conn.close()


def grant_app_everything_to_come(db):
    """What a well-run database does: the app user gets DML on every table the admin creates."""
    if db.provider == "postgresql":
        execute(
            db,
            f'ALTER DEFAULT PRIVILEGES FOR ROLE "{db.admin_username}" IN SCHEMA public '
            f'GRANT {APP_PRIVILEGES} ON TABLES TO "{db.app_username}"',
            f'ALTER DEFAULT PRIVILEGES FOR ROLE "{db.admin_username}" IN SCHEMA public '
            f'GRANT USAGE ON SEQUENCES TO "{db.app_username}"',
        )
    else:
        execute(db, f"GRANT {APP_PRIVILEGES} ON `{db.database}`.* TO '{db.app_username}'@'%'")


def grant_app(db, privileges, table):
    if db.provider == "postgresql":
        execute(db, f'GRANT {privileges} ON "{table}" TO "{db.app_username}"')
        if "INSERT" in privileges:
            execute(db, f'GRANT USAGE ON SEQUENCE "{table}_id_seq" TO "{db.app_username}"')
    else:
        execute(db, f"GRANT {privileges} ON `{db.database}`.`{table}` TO '{db.app_username}'@'%'")


def verify_command(*args):
    """``migrate_tenants --verify ...``: (exit code, stdout)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("migrate_tenants", "--verify", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue()


# --- After an upgrade -------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
def test_upgrade_matches_the_reference_and_the_app_user_passes(registered_tenant, provider):
    tenant = registered_tenant(provider)
    grant_app_everything_to_come(tenant.database)

    run = migrate_once(tenant.target)
    target = run.target

    assert run.status == "succeeded" and target.status == TargetStatus.UP_TO_DATE
    assert not target.drifted
    assert target.schema_fingerprint == verify.reference_for(provider, HEAD).fingerprint
    assert target.verified_at is not None
    assert f"Schema at {HEAD} ({provider}): matches the reference" in run.drift_report
    assert target.drift_report == run.drift_report
    assert (
        f"App user {tenant.database.app_username}: may SELECT, INSERT, UPDATE and DELETE on "
        "every table, and may not run DDL." in run.drift_report
    )
    assert f"matches the reference for {HEAD}" in run.log
    assert f"Grants of app user {tenant.database.app_username}: as expected" in run.log


@pytest.mark.parametrize("provider", PROVIDERS)
def test_column_added_by_hand_is_drift_but_the_run_still_succeeds(registered_tenant, provider):
    tenant = registered_tenant(provider)
    grant_app_everything_to_come(tenant.database)
    migrate_once(tenant.target, revision="0005_expand_full_name")
    execute(tenant.database, "ALTER TABLE accounts ADD COLUMN nickname VARCHAR(50)")

    run = migrate_once(tenant.target)
    target = run.target

    assert run.status == "succeeded" and run.applied == [HEAD]
    assert target.drifted and target.status == TargetStatus.UP_TO_DATE
    assert "extra column accounts.nickname (VARCHAR(50), nullable)" in run.drift_report
    assert "DRIFTED from the reference, 1 difference:" in target.drift_report
    assert "extra column accounts.nickname" in run.log
    assert target.schema_fingerprint != verify.reference_for(provider, HEAD).fingerprint


@pytest.mark.parametrize("provider", PROVIDERS)
def test_verify_command_finds_a_dropped_index_and_exits_1(registered_tenant, provider):
    drifting = registered_tenant(provider)
    clean = registered_tenant(provider)
    for tenant in (drifting, clean):
        grant_app_everything_to_come(tenant.database)
        assert migrate_once(tenant.target).status == "succeeded"
    code, out = verify_command("--tenant", clean.id)
    assert code == 0, out
    assert "1 checked, 0 drifted" in out

    drop = "DROP INDEX ix_projects_account_id"
    execute(drifting.database, drop if provider == "postgresql" else drop + " ON projects")
    code, out = verify_command("--tenant", drifting.id, clean.id)

    assert code == 1
    assert f"{drifting.id}: missing index projects.ix_projects_account_id (account_id)" in out
    assert "2 checked, 1 drifted" in out
    drifting.target.refresh_from_db()
    assert drifting.target.drifted and drifting.target.status == TargetStatus.UP_TO_DATE
    assert "missing index projects.ix_projects_account_id" in drifting.target.drift_report
    verification = drifting.target.runs.get(kind=RunKind.VERIFY, drift_report__contains="missing")
    assert verification.status == "succeeded" and verification.trigger == "command"

    # Put back by hand: the next check says so, and the history records it.
    execute(drifting.database, "CREATE INDEX ix_projects_account_id ON projects (account_id)")
    code, out = verify_command("--tenant", drifting.id)
    assert code == 0, out
    drifting.target.refresh_from_db()
    assert not drifting.target.drifted
    assert "matches the reference" in drifting.target.drift_report


@pytest.mark.parametrize("provider", PROVIDERS)
def test_app_user_without_grants_on_a_new_table_is_reported(registered_tenant, provider):
    tenant = registered_tenant(provider)
    db = tenant.database
    migrate_once(tenant.target, revision="0001_accounts")
    grant_app(db, APP_PRIVILEGES, "accounts")

    run = migrate_once(tenant.target)

    assert run.status == "succeeded" and not run.target.drifted
    assert f"app user {db.app_username} lacks {APP_PRIVILEGES} on projects" in run.drift_report
    assert f"lacks {APP_PRIVILEGES} on accounts" not in run.drift_report
    assert f"Grants: app user {db.app_username} lacks {APP_PRIVILEGES} on projects" in run.log
    if provider == "postgresql":
        assert "lacks USAGE on sequence projects_id_seq" in run.drift_report

    # Half the grants: named one by one. DDL rights: reported as excess.
    grant_app(db, "SELECT, DELETE", "projects")
    if provider == "postgresql":
        execute(db, f'GRANT CREATE ON SCHEMA public TO "{db.app_username}"')
        excess = "may run DDL: CREATE on schema public"
    else:
        execute(db, f"GRANT CREATE, DROP ON `{db.database}`.* TO '{db.app_username}'@'%'")
        excess = f"may run DDL: CREATE, DROP on database {db.database}"
    code, out = verify_command("--tenant", tenant.id)

    assert code == 0  # grants are reported, they are not drift
    assert f"{tenant.id}: app user {db.app_username} lacks INSERT, UPDATE on projects" in out
    assert f"app user {db.app_username} {excess}" in out
    tenant.target.refresh_from_db()
    assert "lacks INSERT, UPDATE on projects" in tenant.target.drift_report


def test_wrong_app_password_is_reported_by_the_login_check_not_fatal(
    registered_tenant, vault_secret
):
    tenant = registered_tenant("postgresql")
    db = tenant.database
    grant_app_everything_to_come(db)
    vault_secret(tenant.target.vault_path, db.secret(app_password="wrong-" + db.app_password))

    # After an upgrade the grants are asked about as admin: right, whatever the password.
    run = migrate_once(tenant.target)
    assert run.status == "succeeded" and not run.target.drifted
    assert f"App user {db.app_username}: may SELECT, INSERT, UPDATE and DELETE" in run.drift_report

    # The fleet check (on demand here, or on its schedule) logs in as the app user.
    code, out = verify_command("--tenant", tenant.id)
    tenant.target.refresh_from_db()
    report = tenant.target.drift_report
    assert f"App user: not checked: cannot log in as app user {db.app_username}" in report
    assert f"Vault secret at secret/data/database/{tenant.target.vault_path}" in report
    assert db.app_password not in report + out + run.log


def test_app_role_that_cannot_log_in_or_is_gone_is_reported_after_an_upgrade(registered_tenant):
    tenant, gone = registered_tenant("postgresql"), registered_tenant("postgresql")
    for each in (tenant, gone):
        grant_app_everything_to_come(each.database)
    execute(tenant.database, f'ALTER ROLE "{tenant.database.app_username}" NOLOGIN')
    execute(
        gone.database,
        f'DROP OWNED BY "{gone.database.app_username}"',
        f'DROP ROLE "{gone.database.app_username}"',
    )

    run = migrate_once(tenant.target)
    name = tenant.database.app_username
    assert run.status == "succeeded"
    assert f"app user {name} lacks LOGIN on role {name}" in run.drift_report

    run = migrate_once(gone.target)
    name = gone.database.app_username
    assert run.status == "succeeded" and not run.target.drifted
    assert (
        f"App user: not checked: app user {name} does not exist on the server: create it, or "
        f"fix app_username in the Vault secret at secret/data/database/{gone.target.vault_path}"
        in run.drift_report
    )


def migrate_counting_statements(target):
    """``migrate_once(target)``, and every statement it sent to a database."""
    statements = []

    def count(conn, cursor, statement, *args):
        statements.append(statement)

    event.listen(Engine, "before_cursor_execute", count)
    try:
        return migrate_once(target), statements
    finally:
        event.remove(Engine, "before_cursor_execute", count)


def assert_recognised(run, first, statements):
    """``run``'s target was verified with the schema of ``first``'s, read once, by the digest
    query: none of the inspector's queries ran."""
    assert not run.target.drifted
    assert run.target.schema_fingerprint == first.target.schema_fingerprint
    column_reads = [statement for statement in statements if "pg_attribute" in statement]
    assert len(column_reads) == 1 and "WITH tables AS" in column_reads[0]


def test_a_schema_seen_before_costs_one_catalog_query_and_hides_no_drift(registered_tenant):
    """PostgreSQL schemas are recognised by a digest of their catalog: the second tenant with
    the same schema is verified with one catalog query, and any difference in what the
    comparison covers, even an enum's labels, still shows as drift."""
    tenants = [registered_tenant("postgresql") for _ in range(3)]
    first = migrate_once(tenants[0].target)
    second, statements = migrate_counting_statements(tenants[1].target)
    assert_recognised(second, first, statements)

    for tenant, labels in ((tenants[1], "'free', 'pro'"), (tenants[2], "'free', 'team'")):
        if tenant is tenants[2]:
            migrate_once(tenant.target)
        execute(
            tenant.database,
            f"CREATE TYPE tier AS ENUM ({labels})",
            "ALTER TABLE accounts ADD COLUMN tier tier",
        )
    code, out = verify_command("--tenant", tenants[1].id, tenants[2].id)

    assert code == 1, out
    assert f"{tenants[1].id}: extra column accounts.tier (ENUM('free','pro'), nullable)" in out
    assert f"{tenants[2].id}: extra column accounts.tier (ENUM('free','team'), nullable)" in out
    execute(tenants[2].database, "ALTER TABLE accounts DROP COLUMN tier")
    code, out = verify_command("--tenant", tenants[2].id)
    assert code == 0, out
    tenants[2].target.refresh_from_db()
    assert tenants[2].target.schema_fingerprint == first.target.schema_fingerprint


def test_a_worker_takes_a_schema_another_worker_read_from_data_dir(registered_tenant, verifying):
    tenants = [registered_tenant("postgresql") for _ in range(2)]
    first = migrate_once(tenants[0].target)
    [stored] = (Path(verifying.DATA_DIR) / "reflected-schemas").glob("*.json")
    # Another worker process, which has reflected nothing yet; the file is what it shares.
    process.reset()
    second, statements = migrate_counting_statements(tenants[1].target)
    assert_recognised(second, first, statements)
    # A file that cannot be read is read again from the database, and written anew.
    stored.write_text("{not json")
    process.reset()
    third = registered_tenant("postgresql")
    assert not migrate_once(third.target).target.drifted
    assert json.loads(stored.read_text())["tables"]


# --- References -------------------------------------------------------------------------------


def test_reference_is_built_once_per_revision_and_provider(registered_tenant, verifying):
    tenants = [registered_tenant("postgresql") for _ in range(2)] + [registered_tenant("mysql")]
    for tenant in tenants:
        assert migrate_once(tenant.target).status == "succeeded"

    assert verify.reference_builds == {("postgresql", HEAD): 1, ("mysql", HEAD): 1}
    cached = list((Path(verifying.DATA_DIR) / "schema-references").glob("*/*.json"))
    assert sorted(path.parent.name for path in cached) == ["mysql", "postgresql"]

    # Another worker (a fresh process cache) reads the file; it builds nothing.
    process.reset()
    code, out = verify_command("--tenant", *(t.id for t in tenants))
    assert code == 0, out
    assert verify.reference_builds == {}
    assert "3 checked, 0 drifted, 0 not verified" in out


def test_provider_without_a_scratch_url_is_not_verified(registered_tenant, settings):
    settings.VERIFY_SCRATCH_POSTGRES_URL = ""
    tenant = registered_tenant("postgresql")

    run = migrate_once(tenant.target)
    target = run.target

    assert run.status == "succeeded" and target.status == TargetStatus.UP_TO_DATE
    assert not target.drifted and target.verified_at is None
    assert target.schema_fingerprint  # the schema was read, there was nothing to compare with
    assert (
        "not verified: no scratch database for postgresql (set VERIFY_SCRATCH_POSTGRES_URL)"
        in target.drift_report
    )
    assert verify.reference_builds == {}
    code, out = verify_command("--tenant", tenant.id)
    assert code == 0 and "not-verified" in out


def test_sqlite_tenant_is_verified_without_any_scratch_server(
    settings, tenant_factory, vault, vault_secret, tmp_path
):
    settings.VERIFY_SCRATCH_POSTGRES_URL = settings.VERIFY_SCRATCH_MYSQL_URL = ""
    tenant = tenant_factory(provider="sqlite", auto_migrate=False)
    path = tmp_path / "tenant.sqlite3"
    vault_secret(tenant.target.vault_path, {"provider": "sqlite", "database": str(path)})

    run = migrate_once(tenant.target)
    assert run.status == "succeeded" and not run.target.drifted
    assert f"Schema at {HEAD} (sqlite): matches the reference" in run.drift_report
    assert "App user" not in run.drift_report  # SQLite has no users

    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE accounts ADD COLUMN nickname VARCHAR(50)")
    code, out = verify_command("--tenant", tenant.id)
    assert code == 1
    assert f"{tenant.id}: extra column accounts.nickname (VARCHAR(50), nullable)" in out
    assert verify.reference_builds == {("sqlite", HEAD): 1}


# --- The fleet --------------------------------------------------------------------------------


def test_scheduled_fleet_check_finds_drift_without_migrating(registered_tenant, settings):
    good, bad = registered_tenant("postgresql"), registered_tenant("mysql")
    for tenant in (good, bad):
        grant_app_everything_to_come(tenant.database)
        migrate_once(tenant.target)
    execute(bad.database, "ALTER TABLE projects DROP COLUMN created_at")
    runs_before = MigrationRun.objects.count()

    lines = check_fleet_for_drift()

    assert lines[-1] == "2 target(s) checked, 1 drifted"
    assert any(
        line.startswith(f"{bad.id}: drifted: missing column projects.created_at (DATETIME")
        for line in lines
    ), lines
    bad.target.refresh_from_db()
    good.target.refresh_from_db()
    assert bad.target.drifted and not good.target.drifted
    assert bad.target.revision == HEAD  # nothing was migrated
    # One run in the history for the drift that appeared; none for the target that is fine.
    [recorded] = MigrationRun.objects.all()[: MigrationRun.objects.count() - runs_before]
    assert recorded.kind == RunKind.VERIFY and recorded.target == bad.target
    assert recorded.trigger == "schedule"
    # Checking again finds the same: nothing new to record.
    check_fleet_for_drift()
    assert MigrationRun.objects.count() == runs_before + 1


def test_drift_schedule_follows_the_setting(settings):
    from django_q.models import Schedule

    settings.VERIFY_SCHEDULE_MINUTES = 60
    ensure_schedules(sender=None)
    schedule = Schedule.objects.get(name=DRIFT_SCHEDULE)
    assert schedule.func == "migrator.tasks.check_fleet_for_drift"
    assert schedule.minutes == 60

    settings.VERIFY_SCHEDULE_MINUTES = 0
    ensure_schedules(sender=None)
    assert not Schedule.objects.filter(name=DRIFT_SCHEDULE).exists()


def test_drift_schedule_of_an_older_release_is_pointed_at_the_task(settings):
    # A schedule row created when the check lived in migrator.verify names that path: the next
    # `migrate` points it at the task, so django-q2 does not fail to import it.
    from django_q.models import Schedule

    settings.VERIFY_SCHEDULE_MINUTES = 60
    ensure_schedules(sender=None)
    Schedule.objects.filter(name=DRIFT_SCHEDULE).update(
        func="migrator.verify.check_fleet_for_drift"
    )
    ensure_schedules(sender=None)
    [schedule] = Schedule.objects.filter(name=DRIFT_SCHEDULE)
    assert schedule.func == "migrator.tasks.check_fleet_for_drift"
    assert schedule.minutes == 60


def test_dashboard_and_admin_show_drift(admin_client, target_factory):
    fingerprint = "a" * 64
    for n in range(3):
        target_factory(name=f"fine-{n}", revision=HEAD, schema_fingerprint=fingerprint)
    drifted = target_factory(
        name="odd-one",
        revision=HEAD,
        schema_fingerprint="b" * 64,
        drifted=True,
        drift_report="Schema at x (postgresql): DRIFTED\n  - extra column accounts.nickname",
    )

    html = admin_client.get(reverse("fleet-dashboard")).content.decode()
    section = html[html.index('id="fleet-fingerprints"') :]
    section = section[: section.index("</table>")]
    assert "1 drifted" in section
    rows = section.split("<tr")
    drifted_row = next(row for row in rows if "fleet-drifted-row" in row)
    assert "bbbbbbbbbbbb" in drifted_row and "drifted__exact=1" in drifted_row
    assert any("aaaaaaaaaaaa" in row and ">3<" in row for row in rows)

    page = admin_client.get(
        reverse("admin:tenants_migrationtarget_change", args=[drifted.pk])
    ).content.decode()
    assert "extra column accounts.nickname" in page
    listing = admin_client.get(
        reverse("admin:tenants_migrationtarget_changelist") + "?drifted__exact=1"
    ).content.decode()
    assert "odd-one" in listing and "fine-0" not in listing


def test_verification_can_be_turned_off(settings, tenant_factory, vault, vault_secret, tmp_path):
    settings.VERIFY_AFTER_UPGRADE = False
    tenant = tenant_factory(provider="sqlite", auto_migrate=False)
    vault_secret(
        tenant.target.vault_path, {"provider": "sqlite", "database": str(tmp_path / "t.db")}
    )

    run = migrate_once(tenant.target)

    assert run.status == "succeeded"
    assert run.drift_report == "" and run.target.schema_fingerprint == ""
    assert verify.reference_builds == {}


def test_what_only_the_server_cares_about_is_normalised_away():
    import sqlalchemy as sa
    from sqlalchemy.dialects import mysql, postgresql

    from migrator.schema import normalise_default, normalise_type

    for spelling in ("CURRENT_TIMESTAMP", "current_timestamp()", "now()", "(CURRENT_TIMESTAMP)"):
        assert normalise_default(spelling) == "current_timestamp"
    assert normalise_default("'x'::character varying") == "'x'"
    assert normalise_default("NULL::character varying") is None
    assert normalise_default("NULL") is None
    assert normalise_default("nextval('accounts_id_seq'::regclass)") == "autoincrement"
    assert normalise_type(mysql.INTEGER(display_width=11)) == normalise_type(sa.Integer())
    assert normalise_type(mysql.VARCHAR(200, collation="utf8mb4_bin")) == "VARCHAR(200)"
    assert normalise_type(postgresql.TIMESTAMP(timezone=True)) == "TIMESTAMP WITH TIME ZONE"
    assert normalise_type(sa.Numeric(10, 2)) == "NUMERIC(10,2)"
