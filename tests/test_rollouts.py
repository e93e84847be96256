"""Rollouts (issue 21): waves, a failure budget, a per-server cap, maintenance windows, resume,
abort and the webhook, on real PostgreSQL and MariaDB fleets, real OpenBao and real ``qcluster``
processes. docs/rollouts.md describes what each shows."""

import http.server
import io
import json
import threading
from contextlib import contextmanager
from datetime import UTC, datetime, time, timedelta

import pytest
from django.core.management import call_command

from tenants import rollouts
from tenants.models import MigrationRun, MigrationTarget, Rollout
from tests.test_dispatch import api_tokens  # noqa: F401 - a fixture
from tests.test_reliability import FIXTURES
from tests.workers import ROOT, manage, process_env, qcluster

pytestmark = [pytest.mark.django_db]


def command(*args):
    """``manage.py`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    try:
        call_command(*args, stdout=out, stderr=err)
    except SystemExit as exc:
        return exc.code, out.getvalue(), err.getvalue()
    except Exception as exc:  # CommandError: what manage.py prints, and its code
        return getattr(exc, "returncode", 1), out.getvalue(), err.getvalue() + str(exc)
    return 0, out.getvalue(), err.getvalue()


class Webhook:
    """A local HTTP server that records the JSON bodies POSTed to it; the first ``fail_first``
    requests get a 500."""

    def __init__(self, fail_first=0):
        self.bodies, self.answers = [], []
        self.fail_first = fail_first
        hook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = 500 if len(hook.answers) < hook.fail_first else 200
                hook.answers.append(status)
                if status == 200:
                    hook.bodies.append(body)
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/rollouts"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def webhook(settings, fail_first=0):
    hook = Webhook(fail_first)
    settings.ROLLOUT_WEBHOOK_URL = hook.url
    settings.ROLLOUT_WEBHOOK_BACKOFF_SECONDS = 0.05
    try:
        yield hook
    finally:
        hook.close()


# --- waves and their order ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, total, sizes",
    [
        ("1,10%,50%,100%", 20, [1, 2, 10, 20]),
        ("1,10%,50%,100%", 5, [1, 3, 5]),  # 10% of 5 is 1: no empty wave
        ("2,5", 10, [2, 5, 10]),  # the rest is one more wave
        ("100%", 3, [3]),
    ],
)
def test_waves_are_cumulative_counts_or_percentages(spec, total, sizes):
    assert rollouts.parse_waves(spec, total) == sizes


@pytest.mark.parametrize("spec", ["", "1,,2", "0", "5,2", "abc", "150%"])
def test_bad_waves_are_a_usage_error(target_factory, spec):
    target_factory()
    code, out, err = command("migrate_tenants", "--all", "--waves", spec)
    assert code == 2, (out, err)
    assert "--waves" in err
    assert not Rollout.objects.exists() and not MigrationRun.objects.exists()


def test_budget_flags_without_waves_are_a_usage_error(target_factory):
    target_factory()
    code, _, err = command("migrate_tenants", "--all", "--max-failures", "1")
    assert code == 2 and "add --waves" in err


def test_dry_run_shows_the_order_canaries_first_spread_over_regions_and_providers(
    target_factory,
):
    for region in ("eu", "us"):
        for provider in ("postgresql", "mysql"):
            for n in range(2):
                target_factory(
                    name=f"{region}-{provider[:2]}-{n}", region=region, provider=provider
                )
    target_factory(name="zz-canary", region="us", provider="mysql", canary=True)
    code, out, _ = command("migrate_tenants", "--all", "--waves", "1,50%,100%", "--dry-run")
    assert code == 0, out
    names = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert names[0] == "zz-canary"
    # Wave 2 (up to 50% of 9, i.e. 5 targets in all) holds one of each region and provider.
    wave_two = {(n.split("-")[0], n.split("-")[1]) for n in names[1:5]}
    assert wave_two == {("eu", "my"), ("eu", "po"), ("us", "my"), ("us", "po")}
    assert "Wave 1 (1 target(s))" in out and "Wave 3 (4 target(s))" in out
    assert not Rollout.objects.exists() and not MigrationRun.objects.exists()


def started_id(out):
    """The rollout id `migrate_tenants --waves` printed."""
    assert "Rollout #" in out, out
    return int(out.split("Rollout #", 1)[1].split()[0])


def canary(tenant):
    MigrationTarget.objects.filter(pk=tenant.target.pk).update(canary=True)
    tenant.target.refresh_from_db()
    return tenant


# --- abort, windows: stepped in this process ------------------------------------------------------


@pytest.mark.vault
@pytest.mark.django_db(transaction=True)
def test_abort_leaves_untouched_targets_untouched_and_tells_the_webhook(
    registered_tenant, settings
):
    from migrator.tasks import read_revision, run_migration
    from tests.dispatch_fixtures import HEAD

    first = canary(registered_tenant("postgresql"))
    others = [registered_tenant("mysql"), registered_tenant("postgresql")]
    with webhook(settings, fail_first=1) as hook:
        code, out, err = command("migrate_tenants", "--all", "--waves", "1,100%", "--bake", "3600")
        assert code == 0, (out, err)
        rollout_id = started_id(out)
        assert err.index(first.target.name) < err.index(others[0].target.name)  # order shown
        [run] = MigrationRun.objects.filter(rollout_id=rollout_id)
        assert run.target == first.target
        run_migration(run.pk)  # the canary's run, as a worker runs it
        rollout = Rollout.objects.get(pk=rollout_id)
        assert rollout.status == "baking"
        assert rollout.bake_until > rollout.started_at + timedelta(seconds=3500)

        code, out, err = command("rollout", "abort", str(rollout_id))
        assert code == 0, (out, err)
        assert f"Rollout #{rollout_id} aborted" in out

        code, out, _ = command("rollout", "show", str(rollout_id))
        assert "aborted" in out and "Untouched:" in out
        for tenant in others:
            assert not MigrationRun.objects.filter(target=tenant.target).exists()
            assert read_revision(tenant.target) is None  # its database was never touched
        assert read_revision(first.target) == HEAD
        code, _, err = command("rollout", "resume", str(rollout_id))
        assert code == 2 and "only a halted rollout" in err
        wait_until(lambda: hook.bodies, 30, "the webhook was not told the rollout was aborted")

    # The webhook: a 500 first, then received once, saying what happened, and no secret.
    assert hook.answers == [500, 200]
    [body] = hook.bodies
    assert body["status"] == "aborted" and body["rollout"] == rollout_id
    assert f"Rollout #{rollout_id} to head aborted" in body["text"]
    assert body["counts"]["pending"] == 2
    sent = json.dumps(body)
    for tenant in [first, *others]:
        assert tenant.database.admin_password not in sent


@pytest.mark.vault
def test_a_target_outside_its_window_waits_and_runs_when_it_opens(registered_tenant):
    from migrator.tasks import read_revision, run_migration
    from tenants.planning import Intent
    from tests.dispatch_fixtures import HEAD

    target = registered_tenant("mysql").target
    target.window_days, target.window_timezone = "sat", "Europe/Paris"
    target.window_start, target.window_end = time(2, 0), time(4, 0)
    target.save()
    saturday_noon = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)  # 13:00 in Paris: closed
    staged = rollouts.plan_rollout([target], Intent.upgrade(), "100%")
    rollout = rollouts.do_start_rollout(staged, trigger="command", now=saturday_noon)
    assert rollout.status == "running"
    assert not MigrationRun.objects.exists()
    [entry] = rollouts.describe(rollout)["waves"][0]["targets"]
    assert entry["state"] == "waiting"

    # A later step, the recovery loop's, before the window: still nothing.
    rollouts.advance(rollout, now=saturday_noon + timedelta(hours=6))
    assert not MigrationRun.objects.exists()

    opened = datetime(2026, 12, 12, 1, 30, tzinfo=UTC)  # the next Saturday, 02:30 in Paris
    rollout = rollouts.advance(rollout, now=opened)
    [run] = MigrationRun.objects.filter(rollout=rollout)
    run_migration(run.pk)
    rollout.refresh_from_db()
    assert rollout.status == "completed"
    assert read_revision(target) == HEAD


# --- real workers ------------------------------------------------------------------------------

FIXED_F003 = '''"""Test revision f003_broken, fixed."""

import sqlalchemy as sa
from alembic import op

revision = "f003_broken"
down_revision = "f002_gadgets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("gizmos", sa.Column("id", sa.Integer(), primary_key=True))


def downgrade() -> None:
    op.drop_table("gizmos")
'''


def wait_until(predicate, timeout, what):
    import time as clock

    deadline = clock.monotonic() + timeout
    while not predicate():
        assert clock.monotonic() < deadline, what
        clock.sleep(0.2)


def copy_scripts(source, tmp_path):
    """A script directory of our own (to fix and deploy again) running the real env.py."""
    import shutil

    scripts = tmp_path / "scripts"
    shutil.copytree(source, scripts)
    (scripts / "env.py").write_text(
        f"import runpy\n\nrunpy.run_path({str(ROOT / 'tenant_migrations' / 'env.py')!r})\n"
    )
    return scripts


@pytest.mark.slow
@pytest.mark.vault
@pytest.mark.django_db(transaction=True)
def test_a_revision_failing_everywhere_touches_only_the_first_wave_and_resume_completes(
    registered_tenant, settings, tmp_path
):
    from migrator.tasks import read_revision

    scripts = copy_scripts(FIXTURES / "failing", tmp_path)
    settings.TENANT_MIGRATIONS_DIR = str(scripts)
    first = canary(registered_tenant("postgresql"))
    fleet = [registered_tenant(kind) for kind in ("mysql", "postgresql", "mysql", "postgresql")]
    hook = Webhook()
    env = process_env(
        workers=2,
        TENANT_MIGRATIONS_DIR=str(scripts),
        ROLLOUT_WEBHOOK_URL=hook.url,
        RUN_HEARTBEAT_SECONDS="2",
    )
    try:
        with qcluster(env, tmp_path / "qcluster.log"):
            result = manage(
                "migrate_tenants",
                "--all",
                "--waves",
                "1,50%,100%",
                "--max-failures",
                "0",
                "--wait",
                "--timeout",
                "150",
                env=env,
                timeout=200,
            )
            said = result.stdout + result.stderr
            assert result.returncode == 1, said
            rollout_id = started_id(result.stdout)
            assert f"Rollout #{rollout_id} to head: halted" in result.stdout, said
            assert f"Failed: {first.target.name}" in result.stdout, said
            assert "rollout resume" in result.stdout  # what to do
            # Exactly the first wave was touched.
            runs = MigrationRun.objects.filter(rollout_id=rollout_id)
            assert [run.target_id for run in runs] == [first.target.pk]
            assert runs[0].status == "failed"
            for tenant in fleet:
                assert not tenant.target.runs.exists()
                assert read_revision(tenant.target) is None
            wait_until(lambda: hook.bodies, 30, "the webhook was not told the rollout halted")
            assert hook.bodies[0]["status"] == "halted"
            assert first.target.name in hook.bodies[0]["text"]

            listed = manage("rollout", "list", "--json", env=env, check=True)
            [entry] = json.loads(listed.stdout)
            assert entry["id"] == rollout_id and entry["status"] == "halted"

            # The fix is deployed; resume takes the whole fleet there.
            (scripts / "versions" / "f003_broken.py").write_text(FIXED_F003)
            result = manage(
                "rollout", "resume", str(rollout_id), "--wait", "--timeout", "150", env=env
            )
            said = result.stdout + result.stderr
            assert result.returncode == 0, said
            assert f"Rollout #{rollout_id} to head: completed" in result.stdout, said
        for tenant in [first, *fleet]:
            assert read_revision(tenant.target) == "f004_never", tenant.target.name
        wait_until(
            lambda: any(body["status"] == "completed" for body in hook.bodies),
            30,
            "the webhook was not told the rollout completed",
        )
    finally:
        hook.close()


@pytest.mark.slow
@pytest.mark.vault
@pytest.mark.django_db(transaction=True)
def test_failures_under_the_rate_budget_do_not_halt(registered_tenant, tmp_path):
    from migrator.tasks import read_revision
    from tests.dispatch_fixtures import HEAD

    broken = canary(registered_tenant("missing-secret"))  # its run fails: no secret
    good_canary = canary(registered_tenant("mysql"))
    rest = [registered_tenant("postgresql"), registered_tenant("mysql")]
    env = process_env(workers=2, RUN_MAX_ATTEMPTS="1")
    with qcluster(env, tmp_path / "qcluster.log"):
        result = manage(
            "migrate_tenants",
            "--all",
            "--waves",
            "2,100%",
            "--max-failure-rate",
            "50%",
            "--wait",
            "--timeout",
            "150",
            env=env,
            timeout=200,
        )
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    assert "completed" in result.stdout
    assert f"Completed with 1 failure(s) within the budget: {broken.target.name}" in said
    for tenant in [good_canary, *rest]:
        assert read_revision(tenant.target) == HEAD


@pytest.mark.slow
@pytest.mark.vault
@pytest.mark.django_db(transaction=True)
def test_the_per_server_cap_holds_under_eight_workers(registered_tenant, tmp_path):
    fleet = [registered_tenant("postgresql") for _ in range(8)]  # one server: 127.0.0.1:5432
    env = process_env(
        workers=8, TENANT_MIGRATIONS_DIR=str(FIXTURES / "slow"), MIGRATOR_TEST_SLEEP="2"
    )
    with qcluster(env, tmp_path / "qcluster.log"):
        result = manage(
            "migrate_tenants",
            "--all",
            "--waves",
            "100%",
            "--per-server",
            "2",
            "--wait",
            "--timeout",
            "200",
            env=env,
            timeout=250,
        )
    said = result.stdout + result.stderr
    assert result.returncode == 0, said
    runs = list(MigrationRun.objects.filter(target__in=[t.target for t in fleet]))
    assert len(runs) == 8 and {run.status for run in runs} == {"succeeded"}
    servers = set(MigrationTarget.objects.filter(runs__in=runs).values_list("server", flat=True))
    assert len(servers) == 1 and servers.pop().endswith(":5432")
    # The most runs in progress at any moment, from their recorded intervals.
    events = sorted(
        [(run.started_at, 1) for run in runs] + [(run.finished_at, -1) for run in runs],
        key=lambda event: (event[0], event[1]),
    )
    peak = now = 0
    for _, change in events:
        now += change
        peak = max(peak, now)
    assert peak == 2, f"at most 2 at once on one server, saw {peak}"


# --- the API, the admin, the dashboard --------------------------------------------------------


@pytest.mark.vault
def test_api_starts_shows_resumes_and_aborts_rollouts(client, api_tokens, registered_tenant):  # noqa: F811
    from migrator.tasks import run_migration

    broken = canary(registered_tenant("missing-secret"))  # its run fails: no secret
    good = canary(registered_tenant("postgresql"))
    rest = [registered_tenant("postgresql"), registered_tenant("mysql")]
    auth = {"Authorization": f"Bearer {api_tokens['good']}"}
    body = {"all": True, "waves": "2,100%", "max_failures": 0}

    assert client.post("/api/rollouts/", body, content_type="application/json").status_code == 401
    denied = client.post(
        "/api/rollouts/",
        body,
        content_type="application/json",
        headers={"Authorization": f"Bearer {api_tokens['no-permission']}"},
    )
    assert denied.status_code == 403
    bad = client.post(
        "/api/rollouts/", {**body, "waves": "5,2"}, content_type="application/json", headers=auth
    )
    assert bad.status_code == 400 and "waves" in bad.json()
    typo = client.post(
        "/api/rollouts/",
        {"tenants": [good.id, "no-such-tenant"], "waves": "100%", "dry_run": True},
        content_type="application/json",
        headers=auth,
    )
    assert typo.status_code == 400, typo.content  # it was a 200 with no wave (a 409 to start)
    assert typo.json() == {"tenants": ["Unknown tenant id(s): no-such-tenant."]}
    preview = client.post(
        "/api/rollouts/", {**body, "dry_run": True}, content_type="application/json", headers=auth
    )
    assert preview.status_code == 200
    first_wave = {row["target"] for row in preview.json()["waves"][0]}
    assert first_wave == {broken.target.name, good.target.name}  # the canaries
    assert not Rollout.objects.exists()

    started = client.post("/api/rollouts/", body, content_type="application/json", headers=auth)
    assert started.status_code == 201, started.content
    data = started.json()
    assert data["status"] == "running" and data["wave_count"] == 2
    runs = MigrationRun.objects.filter(rollout_id=data["id"])
    assert {run.target for run in runs} == {broken.target, good.target}
    run_migration(runs.get(target=good.target).pk)  # succeeds
    run_migration(runs.get(target=broken.target).pk)  # fails: no secret in Vault

    shown = client.get(f"/api/rollouts/{data['id']}", headers=auth).json()
    assert shown["status"] == "halted"
    assert shown["failed"][0]["target"] == broken.target.name
    assert "secret" in shown["failed"][0]["error"].lower()
    assert sorted(shown["untouched"]) == sorted(t.target.name for t in rest)
    assert "rollout resume" in shown["note"]

    # Held meanwhile: the resumed rollout skips it instead of failing it again.
    MigrationTarget.objects.filter(pk=broken.target.pk).update(held=True)
    resumed = client.post(f"/api/rollouts/{data['id']}/resume", headers=auth)
    assert resumed.status_code == 200, resumed.content
    assert resumed.json()["status"] == "running"
    assert resumed.json()["counts"]["skipped"] == 1
    assert MigrationRun.objects.filter(rollout_id=data["id"], status="queued").count() == 2
    assert good.target.runs.count() == 1  # done before the halt: not run again
    again = client.post(f"/api/rollouts/{data['id']}/resume", headers=auth)
    assert again.status_code == 409 and "only a halted one" in again.json()["detail"]

    aborted = client.post(f"/api/rollouts/{data['id']}/abort", headers=auth)
    assert aborted.status_code == 200 and aborted.json()["status"] == "aborted"
    for tenant in rest:
        [cancelled] = tenant.target.runs.all()
        assert cancelled.status == "cancelled" and "nothing ran" in cancelled.error
    listed = client.get("/api/rollouts/", headers=auth).json()
    assert listed["results"][0]["id"] == data["id"]


def test_admin_page_buttons_and_the_dashboard(admin_client, target_factory):
    from django.urls import reverse

    from tenants.planning import Intent

    targets = [target_factory(canary=(n == 0)) for n in range(3)]
    staged = rollouts.plan_rollout(targets, Intent.upgrade(), "1,100%")
    running = rollouts.do_start_rollout(staged, trigger="command")
    halted = Rollout.objects.create(
        revision="head",
        waves_spec="100%",
        waves=[[targets[1].pk]],
        status="halted",
        note="Halted: 1 target(s) failed",
    )

    page = admin_client.get(reverse("admin:tenants_rollout_change", args=[running.pk]))
    html = page.content.decode()
    assert page.status_code == 200
    assert "Wave 1" in html and "Wave 2" in html and targets[0].name in html and "(canary)" in html
    assert "Abort" in html and "Resume" not in html

    fleet = admin_client.get(reverse("fleet-dashboard")).content.decode()
    section = fleet.split('id="fleet-rollouts"', 1)[1].split("</table>", 1)[0]
    assert section.index(f"#{halted.pk}") < section.index(f"#{running.pk}")  # halted first

    response = admin_client.post(reverse("admin:tenants_rollout_steer", args=[running.pk, "abort"]))
    assert response.status_code == 302
    running.refresh_from_db()
    assert running.status == "aborted"
    assert MigrationRun.objects.get(target=targets[0]).status == "cancelled"

    # The target's page sets the canary flag and a window; a bad one is refused, saying why.
    url = reverse("admin:tenants_migrationtarget_change", args=[targets[2].pk])
    form = admin_client.get(url).context["adminform"].form
    data = {k: v for k, v in form.initial.items() if v is not None and k in form.fields}
    data.update(
        canary="on",
        window_days="sat-sun",
        window_start="02:00",
        window_end="04:00",
        window_timezone="Mars/Olympus",
    )
    refused = admin_client.post(url, data)
    assert refused.status_code == 200 and "is not a time zone" in refused.content.decode()
    data["window_timezone"] = "Europe/Paris"
    assert admin_client.post(url, data).status_code == 302
    targets[2].refresh_from_db()
    assert targets[2].canary and targets[2].window_days == "sat-sun"


def test_a_baking_rollout_says_until_when_and_its_page_has_no_save(admin_client, target_factory):
    """The admin page and the dashboard say when a bake ends (only `rollout show` did); the
    rollout's page is read-only (it had Save buttons that saved nothing); Abort is a button."""
    from django.urls import reverse

    target = target_factory()
    rollout = Rollout.objects.create(
        revision="head",
        waves_spec="1,100%",
        waves=[[target.pk], []],
        status="baking",
        bake_seconds=600,
        bake_until=datetime(2026, 12, 2, 11, 5, 5, tzinfo=UTC),
    )
    page = admin_client.get(reverse("admin:tenants_rollout_change", args=[rollout.pk]))
    html = page.content.decode()
    assert page.status_code == 200
    assert "Bake until" in html and "11:05" in html
    assert 'name="_save"' not in html and 'name="_continue"' not in html
    assert '<button type="submit" class="rollout-steer">Abort</button>' in html

    fleet = admin_client.get(reverse("fleet-dashboard")).content.decode()
    section = fleet.split('id="fleet-rollouts"', 1)[1].split("</table>", 1)[0]
    assert "Baking until 11:05:05 UTC" in section, section


def test_the_dashboard_counts_a_rollouts_targets_as_rollout_show_does(admin_client, target_factory):
    """A target that failed, was resumed and failed again is one failed target on the dashboard,
    not two; one that failed and succeeded after the resume is done (it counted failed runs:
    '3 failed, of 6 targets' next to a note saying 1 of 1 failed)."""
    from django.urls import reverse

    again, fixed, halted_by = (target_factory() for _ in range(3))
    rollout = Rollout.objects.create(
        revision="head",
        waves_spec="1,100%",
        waves=[[again.pk, fixed.pk], [halted_by.pk]],
        status="halted",
        note="Halted: 1 target(s) failed, more than --max-failures 0",
    )

    def run(target, status, **fields):
        return MigrationRun.objects.create(
            target=target, trigger="command", rollout=rollout, status=status, **fields
        )

    run(again, "failed", error="f003 failed")
    run(fixed, "failed", error="f003 failed")
    run(halted_by, "cancelled", error_code=rollouts.HALTED_CODE)
    rollout.resumed_after_run = MigrationRun.objects.latest("pk").pk
    rollout.save(update_fields=["resumed_after_run"])
    run(again, "failed", error="f003 failed again")
    run(fixed, "succeeded")

    shown = rollouts.describe(rollout)["counts"]
    assert (shown["done"], shown["failed"], shown["pending"]) == (1, 1, 1)
    fleet = admin_client.get(reverse("fleet-dashboard")).content.decode()
    section = fleet.split('id="fleet-rollouts"', 1)[1].split("</table>", 1)[0]
    assert "1 done, 0 under way, 1 failed, of 3 targets" in section, section


@pytest.mark.parametrize(
    "setting, value",
    [
        ("ROLLOUT_WEBHOOK_URL", "hooks.slack.com/services/x"),
        ("ROLLOUT_PER_SERVER_CONCURRENCY", "-1"),
        ("ROLLOUT_WEBHOOK_ATTEMPTS", "0"),
    ],
)
def test_bad_rollout_settings_are_named_at_start(setting, value):
    from tests.test_settings_checks import run_manage

    result = run_manage("check", DEBUG="true", VAULT_TOKEN="x", **{setting: value})
    assert result.returncode != 0
    assert "controlplane.E061" in result.stderr and setting in result.stderr


def test_json_output_of_a_started_rollout(target_factory):
    targets = [target_factory(), target_factory()]
    code, out, err = command("migrate_tenants", "--all", "--waves", "1,100%", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["status"] == "running" and data["wave_count"] == 2
    assert f"Rollout #{data['id']} started" in err
    assert [entry["state"] for entry in data["waves"][0]["targets"]] == ["active"]
    assert data["untouched"] == [targets[1].name]
    code, out, _ = command("rollout", "list", "--json")
    assert json.loads(out)[0]["id"] == data["id"]
    code, _, err = command("rollout", "show", "999999")
    assert code == 2 and "No rollout #999999" in err


def test_the_target_api_sets_canary_and_a_checked_window(client, django_user_model, target_factory):
    from tests.test_registration_api import _token

    target = target_factory()
    auth = {"Authorization": f"Bearer {_token(django_user_model, 'ops', 'register_tenants')}"}
    url = f"/api/targets/{target.name}"
    bad = client.patch(
        url, {"window_days": "caturday"}, content_type="application/json", headers=auth
    )
    assert bad.status_code == 400 and "caturday" in bad.json()["window_days"][0]
    good = client.patch(
        url,
        {
            "canary": True,
            "window_days": "mon-fri",
            "window_start": "22:00",
            "window_end": "02:00",
            "window_timezone": "America/New_York",
        },
        content_type="application/json",
        headers=auth,
    )
    assert good.status_code == 200, good.content
    assert good.json()["canary"] is True and good.json()["window_days"] == "mon-fri"
    target.refresh_from_db()
    assert target.canary
    # Across midnight: Saturday 01:00 in New York is still Friday night's window.
    assert rollouts.in_window(target, datetime(2026, 12, 5, 6, 0, tzinfo=UTC))
    assert not rollouts.in_window(target, datetime(2026, 12, 5, 12, 0, tzinfo=UTC))


def test_the_import_sets_canary_on_a_tenant_database(tmp_path):
    from tenants.models import MigrationTarget

    path = tmp_path / "tenants.csv"
    path.write_text(
        "tenant_id,name,database_strategy,database_provider,canary\n"
        "acme,Acme,dedicated,postgresql,true\n"
        "globex,Globex,dedicated,mysql,\n"
    )
    code, out, err = command("import_tenants", str(path))
    assert code == 0, err
    assert MigrationTarget.objects.get(name="acme").canary
    assert not MigrationTarget.objects.get(name="globex").canary
    path.write_text(
        "tenant_id,name,database_strategy,database_provider,canary\n"
        "acme,Acme,dedicated,postgresql,false\n"
    )
    code, out, err = command("import_tenants", str(path))
    assert code == 0, err
    assert "1 updated" in out
    assert not MigrationTarget.objects.get(name="acme").canary
    exported = io.StringIO()
    call_command("export_tenants", "--format", "csv", stdout=exported)
    assert exported.getvalue().splitlines()[0].endswith(",canary")


@pytest.mark.vault
def test_the_next_wave_waits_for_the_bake_time(registered_tenant):
    from django.utils import timezone

    from migrator.tasks import read_revision, run_migration
    from tests.dispatch_fixtures import HEAD

    first = canary(registered_tenant("postgresql"))
    second = registered_tenant("mysql")
    code, out, err = command("migrate_tenants", "--all", "--waves", "1,100%", "--bake", "600")
    assert code == 0, err
    rollout = Rollout.objects.get(pk=started_id(out))
    run_migration(MigrationRun.objects.get(rollout=rollout).pk)
    rollout.refresh_from_db()
    assert rollout.status == "baking"
    code, out, _ = command("rollout", "show", str(rollout.pk))
    assert "Baking until" in out
    # The recovery loop's steps: before the bake ends nothing more is queued; after, wave 2 is.
    rollouts.advance(rollout, now=timezone.now() + timedelta(seconds=300))
    assert not second.target.runs.exists()
    rollout = rollouts.advance(rollout, now=timezone.now() + timedelta(seconds=601))
    assert rollout.status == "running" and rollout.current_wave == 1
    run_migration(second.target.runs.get().pk)
    rollout.refresh_from_db()
    assert rollout.status == "completed"
    assert read_revision(first.target) == read_revision(second.target) == HEAD


@pytest.mark.vault
def test_a_revision_deployed_during_a_rollout_never_reaches_its_later_waves(
    registered_tenant, settings, tmp_path
):
    """A rollout to head goes to the head(s) of when it started: a revision copied in while
    the canary bakes halts it before wave 2, which no canary ran; taken back, resume goes on."""
    import shutil

    from django.utils import timezone

    from migrator.tasks import read_revision, run_migration
    from tests.test_deploy import LINEAR_HEAD, write_revision

    location = tmp_path / "migrations"
    location.mkdir()
    for name in ("env.py", "script.py.mako"):
        shutil.copy(ROOT / "tenant_migrations" / name, location)
    shutil.copytree(
        FIXTURES / "linear" / "versions",
        location / "versions",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    settings.TENANT_MIGRATIONS_DIR = str(location)
    first = canary(registered_tenant("postgresql"))
    second = registered_tenant("mysql")
    code, out, err = command("migrate_tenants", "--all", "--waves", "1,100%", "--bake", "600")
    assert code == 0, err
    rollout = Rollout.objects.get(pk=started_id(out))
    run_migration(MigrationRun.objects.get(rollout=rollout).pk)
    assert read_revision(first.target) == LINEAR_HEAD

    write_revision(location / "versions", "0005_deploy_notes", LINEAR_HEAD, "deploy_notes")
    rollout = rollouts.advance(rollout, now=timezone.now() + timedelta(seconds=601))
    assert rollout.status == "halted"
    assert "head(s) changed since the rollout started" in rollout.note
    assert "0005_deploy_notes" in rollout.note
    assert not second.target.runs.exists()
    assert read_revision(second.target) is None  # never touched

    (location / "versions" / "0005_deploy_notes.py").unlink()
    code, out, err = command("rollout", "resume", str(rollout.pk))
    assert code == 0, out + err
    run_migration(second.target.runs.get().pk)
    rollout.refresh_from_db()
    assert rollout.status == "completed"
    assert read_revision(second.target) == LINEAR_HEAD


def test_a_target_no_queue_serves_fails_the_rollout_instead_of_stalling_it(
    target_factory, settings
):
    settings.REGION_CLUSTERS = {"eu": "controlplane-eu"}
    target_factory(name="lost", region="us")
    code, out, err = command("migrate_tenants", "--all", "--waves", "100%")
    assert code == 0, err
    rollout = Rollout.objects.get(pk=started_id(out))
    assert rollout.status == "halted"
    code, out, _ = command("rollout", "show", str(rollout.pk))
    assert "lost" in out and "REGION_CLUSTERS" in out
