"""One planner behind every entry point (issue 18), and what it means for undo, for requests
that are not carried out, for ``--wait`` with retries and for the blue/green docs (issue 16).

Each test drives what a user drives: ``migrate_tenants``, the admin through Django's test
client, the HTTP API with a real token; against real PostgreSQL, MariaDB and OpenBao.
"""

import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from migrator import runner
from migrator.tasks import run_migration
from tenants import actions
from tenants.models import MigrationRun, MigrationTarget, Trigger
from tests.dispatch_fixtures import HEAD
from tests.test_dispatch import api_tokens  # noqa: F401 - a fixture
from tests.test_reliability import _target_of, migrate_once
from tests.test_rollback_phases import columns

pytestmark = [pytest.mark.django_db, pytest.mark.vault]

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "alembic_fixtures"
TARGETS = "admin:tenants_migrationtarget_changelist"


def command(*args):
    """``migrate_tenants`` as a user runs it: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("migrate_tenants", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    except CommandError as exc:
        code = exc.returncode
        err.write(str(exc))
    return code, out.getvalue(), err.getvalue()


def admin_action(client, action, target_ids, **form):
    return client.post(
        reverse(TARGETS), {"action": action, "_selected_action": target_ids, **form}, follow=True
    )


def options_of(page):
    """The downgrade picker's options, and the one selected."""
    text = page.content.decode()
    select = text.split('<select name="revision"')[1].split("</select>")[0]
    found = re.findall(r'<option value="([^"]+)"( selected)?>', select)
    return [value for value, _ in found], [value for value, on in found if on]


# --- issue 18: the plan, the preview ------------------------------------------------------------


def test_dry_run_on_a_fleet_already_at_head(registered_tenant, admin_client):
    """The README's own ``--dry-run`` on an up-to-date fleet: a row per target, no KeyError;
    the admin's preview says the same."""
    pg, my = registered_tenant("postgresql"), registered_tenant("mysql")
    for tenant in (pg, my):
        migrate_once(tenant.target)
    runs = MigrationRun.objects.count()

    code, out, err = command("--all", "--dry-run")

    assert code == 0, err
    for tenant in (pg, my):
        line = next(line for line in out.splitlines() if line.startswith(tenant.id + " "))
        assert HEAD in line and "live" in line
    assert "Preview: nothing was run. 2 nothing-to-do" in out

    code, out, _ = command("--all", "--dry-run", "--json")
    rows = {row["target"]: row for row in json.loads(out)}
    assert code == 0
    for tenant in (pg, my):
        row = rows[tenant.id]
        assert (row["status"], row["source"], row["stands_at"], row["steps"]) == (
            "nothing-to-do",
            "live",
            HEAD,
            [],
        )

    page = admin_action(admin_client, "preview_sql", [pg.target_id, my.target_id])
    text = page.content.decode()
    assert page.status_code == 200
    assert f"from {HEAD} (live) to head" in text and "Nothing to apply: already at head" in text
    assert MigrationRun.objects.count() == runs


def test_revisions_that_cannot_render_offline_are_a_row_not_a_traceback(
    registered_tenant, settings, admin_client
):
    settings.TENANT_MIGRATIONS_DIR = str(FIXTURES / "data_migration")
    fresh = registered_tenant("postgresql")  # from base: d002 cannot render (CompileError)
    reads = registered_tenant("postgresql")  # from d002: d003 iterates rows (TypeError)
    past = registered_tenant("mysql")  # from d003: only d004, which renders
    migrate_once(reads.target, revision="d002_backfill_status")
    migrate_once(past.target, revision="d003_email_domain")
    no_secret = registered_tenant("missing-secret")

    code, out, err = command("--all", "--dry-run", "--json")

    rows = {row["target"]: row for row in json.loads(out)}
    assert len(rows) == 4
    assert rows[fresh.id]["sql"] is None
    assert "untyped sa.column()" in rows[fresh.id]["no_sql"]
    assert "The run itself is not affected" in rows[fresh.id]["no_sql"]
    assert rows[reads.id]["sql"] is None and "TypeError" in rows[reads.id]["no_sql"]
    assert "ADD COLUMN name VARCHAR(100)" in rows[past.id]["sql"]
    assert rows[past.id]["source"] == "live"
    # The target whose secret is missing is planned from the record, and says why.
    assert rows[no_secret.id]["source"] == "record"
    assert f"secret/data/database/{no_secret.id}" in rows[no_secret.id]["source_note"]
    assert code == 1  # one live revision could not be read

    code, out, _ = command("--target", fresh.target.name, past.target.name, "--dry-run")
    assert code == 0
    assert "untyped sa.column()" in out and "ADD COLUMN name" in out

    page = admin_action(
        admin_client, "preview_sql", [fresh.target_id, reads.target_id, past.target_id]
    )
    text = page.content.decode()
    assert page.status_code == 200
    assert "untyped sa.column()" in text and "TypeError" in text
    assert "ADD COLUMN name" in text and "(live)" in text

    # Online, the same revisions run.
    assert migrate_once(fresh.target).status == "succeeded"
    assert migrate_once(reads.target).status == "succeeded"


def test_sqlite_downgrade_and_undo_pages_render_and_run(
    admin_client, vault, vault_secret, target_factory, tmp_path
):
    """Alembic's batch mode cannot render offline on SQLite: the pages say so, and run."""
    vault_secret("lite", {"provider": "sqlite", "database": str(tmp_path / "lite.sqlite3")})
    target = target_factory(name="lite", provider="sqlite", vault_path="lite")
    migrate_once(target)

    code, out, _ = command("--target", "lite", "--to", "0003_projects_account_name", "--dry-run")
    assert code == 0
    assert "downgrade" in out and "No SQL can be shown: a revision uses batch mode" in out

    page = admin_action(
        admin_client, "downgrade_to_revision", [target.pk], revision="0003_projects_account_name"
    )
    text = page.content.decode()
    assert page.status_code == 200
    assert "batch mode" in text and "Yes, downgrade 1 target" in text

    admin_action(
        admin_client,
        "downgrade_to_revision",
        [target.pk],
        revision="0003_projects_account_name",
        confirm="yes",
    )
    run = MigrationRun.objects.get(kind="downgrade")
    run_migration(run.pk)
    target.refresh_from_db()
    assert target.revision == "0003_projects_account_name"

    page = admin_action(admin_client, "undo_last_run", [target.pk])
    text = page.content.decode()
    assert page.status_code == 200
    assert f"<td>{HEAD}</td>" in text and "Yes, run it for 1 target" in text


def test_downgrade_picker_offers_valid_revisions_and_defaults_to_the_previous(
    admin_client, registered_tenant
):
    at_head, older = registered_tenant("postgresql"), registered_tenant("postgresql")
    migrate_once(at_head.target)
    migrate_once(older.target, revision="0003_projects_account_name")

    offered, selected = options_of(
        admin_action(admin_client, "downgrade_to_revision", [at_head.target_id])
    )
    # 0005 (expand) is below head but Alembic cannot go there from the contract head in one
    # downgrade: not offered. base is offered last, never by default.
    assert offered == [
        "0004_accounts_display_name",
        "0003_projects_account_name",
        "0002_projects",
        "0001_accounts",
        "base",
    ]
    assert selected == ["0004_accounts_display_name"]

    both = [at_head.target_id, older.target_id]
    page = admin_action(admin_client, "downgrade_to_revision", both)
    offered, selected = options_of(page)
    assert offered == ["0002_projects", "0001_accounts", "base"]
    assert selected == ["0002_projects"]
    assert "Yes, downgrade 2 targets" in page.content.decode()

    # A revision not offered is refused; nothing is queued.
    page = admin_action(
        admin_client,
        "downgrade_to_revision",
        both,
        revision="0004_accounts_display_name",
        confirm="yes",
    )
    assert "is not a revision every selected target can be downgraded to" in page.content.decode()
    assert not MigrationRun.objects.filter(kind="downgrade").exists()


def test_api_revision_body_and_reasons(client, api_tokens, registered_tenant):  # noqa: F811
    tenant = registered_tenant("postgresql")
    migrate_once(tenant.target)
    url = f"/api/tenants/{tenant.id}/migrate"
    auth = {"Authorization": f"Bearer {api_tokens['good']}"}

    def post(body):
        return client.post(url, body, content_type="application/json", headers=auth)

    refused = post({"revision": "0002_projects"})
    assert refused.status_code == 409
    assert refused.json()["status"] == "refused"
    assert "allow_downgrade" in refused.json()["reason"]

    unknown = post({"revision": "nope"})
    assert unknown.status_code == 409 and "Unknown revision 'nope'" in unknown.json()["reason"]

    skipped = post({"revision": "head"})
    assert skipped.status_code == 202 and skipped.json()["reason"] is None
    run_migration(skipped.json()["id"])
    status = client.get(f"/api/runs/{skipped.json()['id']}", headers=auth).json()
    assert status["status"] == "skipped"
    assert status["reason"] == (
        f"nothing to apply: the database already stood at {HEAD} (upgrade to head)"
    )

    down = post({"revision": "0002_projects", "allow_downgrade": True})
    assert down.status_code == 202 and down.json()["kind"] == "downgrade"
    # While it is queued, an upgrade is not carried out, and the answer says why.
    up = post({})
    assert up.status_code == 409
    assert up.json()["reason"] == (
        f"Run #{down.json()['id']} for {tenant.target.name} is already queued (downgrade to "
        "0002_projects); your upgrade to head was not queued. Cancel that run or wait for it, "
        "then ask again."
    )
    assert MigrationRun.objects.filter(status="queued").count() == 1

    MigrationTarget.objects.filter(pk=tenant.target_id).update(held=True)
    MigrationRun.objects.filter(status="queued").update(status="cancelled")
    held = post({})
    assert held.status_code == 409 and "the target is held" in held.json()["reason"]


# --- issue 16.2: undo goes back where the last run started -------------------------------------


def test_undo_after_a_downgrade_goes_back_up(registered_tenant):
    tenant = registered_tenant("postgresql")
    migrate_once(tenant.target, revision="0004_accounts_display_name")
    code, _, err = command("--tenant", tenant.id, "--to", "0002_projects", "--sync", "--yes")
    assert code == 0, err

    code, out, err = command("--tenant", tenant.id, "--undo-last", "--sync", "--yes")

    assert code == 0, err
    run = MigrationRun.objects.filter(target=tenant.target).first()
    assert (run.kind, run.revision_before, run.revision_after) == (
        "upgrade",
        "0002_projects",
        "0004_accounts_display_name",
    )
    assert runner.current(_target_of(tenant)).revision == "0004_accounts_display_name"


def test_undo_is_refused_when_the_target_moved_since_the_last_run(registered_tenant):
    from migrator.tasks import migrate

    tenant = registered_tenant("postgresql")
    last = migrate_once(tenant.target, revision="0003_projects_account_name")
    migrate(tenant.target, revision="0004_accounts_display_name")  # behind the record's back

    code, out, err = command("--tenant", tenant.id, "--undo-last", "--sync", "--yes")

    assert code == 2
    assert (
        f"no longer stands where run #{last.pk} left it (0003_projects_account_name): it stands "
        "at 0004_accounts_display_name (live)"
    ) in err
    assert not MigrationRun.objects.filter(kind="downgrade").exists()
    assert runner.current(_target_of(tenant)).revision == "0004_accounts_display_name"


def test_undo_of_a_contract_run_reverts_only_the_contract(registered_tenant, admin_client):
    tenant = registered_tenant("postgresql")
    migrate_once(tenant.target, revision="0004_accounts_display_name")
    assert command("--tenant", tenant.id, "--phase", "expand", "--sync")[0] == 0
    assert command("--tenant", tenant.id, "--phase", "contract", "--sync")[0] == 0
    assert "display_name" not in columns(tenant, "accounts")

    page = admin_action(admin_client, "undo_last_run", [tenant.target_id])
    text = page.content.decode()
    assert "<td>0005_expand_full_name</td>" in text and "Yes, downgrade 1 target" in text
    # The CLI's preview plans the same: back to the expand head, the contract's downgrade SQL.
    code, out, err = command("--tenant", tenant.id, "--undo-last", "--dry-run", "--json")
    [row] = json.loads(out)
    assert code == 0, err
    assert (row["kind"], row["goes_to"], row["steps"], row["undoes_run"]) == (
        "downgrade",
        "0005_expand_full_name",
        ["0006_contract_drop_display_name"],
        MigrationRun.objects.filter(phase="contract").get().pk,
    )
    assert "ADD COLUMN display_name" in row["sql"]

    code, _, err = command("--tenant", tenant.id, "--undo-last", "--sync", "--yes")

    assert code == 0, err
    assert MigrationTarget.objects.get(pk=tenant.target_id).revision == "0005_expand_full_name"
    assert {"display_name", "full_name"} <= columns(tenant, "accounts")


# --- issue 16.9: what is not done is said ---------------------------------------------------


def test_a_downgrade_asked_while_an_upgrade_is_queued_is_said_and_exits_1(
    registered_tenant, admin_client
):
    tenant = registered_tenant("postgresql")
    migrate_once(tenant.target)
    [queued] = actions.do_enqueue_runs([tenant.target], trigger=Trigger.ADMIN, enqueue=False)

    code, out, err = command("--tenant", tenant.id, "--to", "0002_projects", "--yes")

    assert code == 1
    assert (
        f"Run #{queued.run.pk} for {tenant.target.name} is already queued (upgrade to head); "
        "your downgrade to 0002_projects was not queued"
    ) in err
    assert MigrationRun.objects.filter(target=tenant.target, status="queued").count() == 1

    # The same request again is under way already: said, and not a failure.
    code, out, err = command("--tenant", tenant.id)
    assert code == 0
    assert f"Run #{queued.run.pk} for {tenant.target.name} is already queued; no second" in err

    page = admin_action(
        admin_client,
        "downgrade_to_revision",
        [tenant.target_id],
        revision="0002_projects",
        confirm="yes",
    )
    assert "your downgrade to 0002_projects was not queued" in page.content.decode()


# --- issue 16.10: --wait counts targets, to their last attempt ---------------------------------


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_wait_counts_targets_until_their_last_attempt(registered_tenant, vault_secret, tmp_path):
    from tests.workers import manage, process_env, qcluster

    good = registered_tenant("postgresql")
    unreachable = registered_tenant("postgresql")
    secret = {**unreachable.database.secret(), "port": "1"}  # nothing listens: retryable
    vault_secret(unreachable.target.vault_path, secret)
    env = process_env(RUN_RETRY_BACKOFF_SECONDS="1", RUN_MAX_ATTEMPTS="3")
    with qcluster(env, tmp_path / "qcluster.log"):
        result = manage(
            "migrate_tenants", "--all", "--wait", "--timeout", "150", env=env, timeout=200
        )
    assert result.returncode == 1, result.stderr
    assert "Gave up waiting" not in result.stderr, (tmp_path / "qcluster.log").read_text()
    progress = re.findall(r"(\d+)/(\d+) done, (\d+) failed", result.stderr)
    assert progress and {total for _, total, _ in progress} == {"2"}
    assert progress[-1] == ("2", "2", "1")
    attempts = MigrationRun.objects.filter(target=unreachable.target).order_by("attempt")
    assert [run.attempt for run in attempts] == [1, 2, 3]
    assert all(run.status == "failed" for run in attempts)
    # The summary shows each target once, at its last attempt.
    lines = [line for line in result.stdout.splitlines() if line.startswith(unreachable.id)]
    assert len(lines) == 1
    assert MigrationRun.objects.get(target=good.target).status == "succeeded"


# --- issue 16.11: the blue/green docs' commands, as written ------------------------------------


def test_the_blue_green_docs_commands_build_two_branches(tmp_path):
    """Run docs/blue-green.md's ``alembic revision`` commands, as written, on a copy of
    tenant_migrations/ without the pair, and check the history they build."""
    docs = (ROOT / "docs" / "blue-green.md").read_text()
    block = docs.split("```bash", 1)[1].split("```", 1)[0]
    commands = [
        " ".join(part.strip() for part in cmd.split("\\\n"))
        for cmd in re.split(r"\n(?=\s*alembic )", block.strip())
    ]
    assert len(commands) == 2 and all(c.startswith("alembic revision") for c in commands)

    shutil.copytree(ROOT / "tenant_migrations", tmp_path / "tenant_migrations")
    for written in (tmp_path / "tenant_migrations" / "versions").glob("000[56]_*.py"):
        written.unlink()
    shutil.copy(ROOT / "alembic.ini", tmp_path / "alembic.ini")
    import shlex

    for line in commands:
        result = subprocess.run(
            [sys.executable, "-m", *shlex.split(line)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, (line, result.stdout, result.stderr)

    heads = subprocess.run(
        [sys.executable, "-m", "alembic", "heads"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "0005_expand_full_name (expand)" in heads
    assert "0006_contract_drop_display_name (contract)" in heads
    script = runner.script_directory(tmp_path / "tenant_migrations")
    expand = script.get_revision("0005_expand_full_name")
    contract = script.get_revision("0006_contract_drop_display_name")
    assert expand.down_revision == contract.down_revision == "0004_accounts_display_name"
    assert (expand.branch_labels, contract.branch_labels) == ({"expand"}, {"contract"})
    assert contract.dependencies == "0005_expand_full_name"


# --- issue 17: usage errors ---------------------------------------------------------------


def test_bad_revision_or_timeout_is_a_usage_error(registered_tenant):
    tenant = registered_tenant("postgresql")
    code, _, err = command("--tenant", tenant.id, "--to", "")
    assert code == 2 and "--to needs a revision" in err
    code, _, err = command("--tenant", tenant.id, "--wait", "--timeout", "-5")
    assert code == 2 and "--timeout must be 0" in err
    assert not MigrationRun.objects.exists()


def test_a_held_target_is_said_and_skipped_without_failing_the_others(registered_tenant):
    held, other = registered_tenant("postgresql"), registered_tenant("postgresql")
    MigrationTarget.objects.filter(pk=held.target_id).update(held=True)

    code, out, err = command("--all", "--sync")

    assert code == 0, err
    assert f"Not queued for {held.target.name}: the target is held" in err
    assert MigrationRun.objects.get(target=other.target).status == "succeeded"
    assert not MigrationRun.objects.filter(target=held.target).exists()
    # A downgrade of the selection goes on for the others too.
    code, _, err = command("--all", "--to", "0002_projects", "--sync", "--yes")
    assert code == 0, err
    assert MigrationTarget.objects.get(pk=other.target_id).revision == "0002_projects"


def test_planning_a_page_costs_the_same_queries_for_3_targets_or_30(admin_client, target_factory):
    """The undo and downgrade pages read the history and the record in a few statements,
    whatever the selection (live reads go to the databases, not to the control plane)."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    def targets(count):
        made = []
        for _ in range(count):
            target = target_factory(revision=HEAD, status="up_to_date")
            MigrationRun.objects.create(
                target=target,
                kind="upgrade",
                trigger="command",
                requested_revision="head",
                status="succeeded",
                revision_before="0004_accounts_display_name",
                revision_after=HEAD,
                applied=["0005_expand_full_name", "0006_contract_drop_display_name"],
            )
            made.append(target.pk)
        return made

    counts = {}
    # The process's first page checks the stored statuses against the heads once (one read):
    # not a cost of the selection.
    admin_client.get(reverse("admin:tenants_migrationtarget_changelist"))
    for count in (3, 30):
        selected = targets(count)
        for action in ("undo_last_run", "downgrade_to_revision"):
            with CaptureQueriesContext(connection) as queries:
                page = admin_action(admin_client, action, selected)
            assert page.status_code == 200
            counts[count, action] = len(queries.captured_queries)
        assert "<td>0004_accounts_display_name</td>" in page.content.decode()
    assert counts[3, "undo_last_run"] == counts[30, "undo_last_run"]
    assert counts[3, "downgrade_to_revision"] == counts[30, "downgrade_to_revision"]
