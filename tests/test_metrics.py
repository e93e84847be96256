"""/metrics: the Prometheus text format, read from the control plane's database at scrape time,
so every web process reports the same numbers whichever worker recorded the runs; the same few
queries with ten thousand runs as with ten; a bearer token when METRICS_TOKEN is set."""

import datetime
import re
from pathlib import Path

import pytest
from django.urls import reverse
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from tenants.models import MigrationRun, MigrationTarget
from tests.dispatch_fixtures import HEAD

pytestmark = pytest.mark.django_db

OLD = "0002_projects"


@pytest.fixture(autouse=True)
def no_token(settings):
    settings.METRICS_TOKEN = ""


def scrape(client, **headers):
    response = client.get(reverse("metrics"), headers=headers)
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return parse(response.content.decode())


def parse(text):
    """{sample name: {frozenset of label items: value}} of a scrape."""
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return samples


def value(samples, name, **labels):
    return samples[name][frozenset(labels.items())]


def make_targets(*specs):
    """Targets from (name, provider, region, status, revision[, drifted]) tuples."""
    return {
        target.name: target
        for target in MigrationTarget.objects.bulk_create(
            MigrationTarget(
                name=name,
                kind="dedicated",
                provider=provider,
                region=region,
                vault_path=name,
                status=status,
                revision=revision,
                drifted=bool(rest and rest[0]),
            )
            for name, provider, region, status, revision, *rest in specs
        )
    }


@pytest.fixture
def fleet():
    """Three MySQL targets in eu (one failed, one behind, one never checked), three PostgreSQL
    ones in us at head (one drifted), and runs: 3 failed in eu (Vault and database errors),
    4 succeeded in us with known durations and revisions applied, 2 queued and 1 running."""
    t = make_targets(
        ("m1", "mysql", "eu", "failed", OLD),
        ("m2", "mysql", "eu", "behind", OLD),
        ("m3", "mysql", "eu", "unknown", ""),
        ("p1", "postgresql", "us", "up_to_date", HEAD),
        ("p2", "postgresql", "us", "up_to_date", HEAD, True),
        ("p3", "postgresql", "us", "migrating", HEAD),
    )

    def run(target, status, **fields):
        fields.setdefault("trigger", "admin")
        return MigrationRun(target=t[target], status=status, **fields)

    MigrationRun.objects.bulk_create(
        [
            run("m1", "failed", error_code="vault_unavailable", duration_ms=40),
            run("m1", "failed", error_code="vault_unavailable", duration_ms=60),
            run("m2", "failed", error_code="secret_not_found", duration_ms=30),
            run("m2", "failed", error_code="database_unreachable", trigger="signal"),
            run("p1", "succeeded", trigger="command", applied=["0003", "0004"], duration_ms=50),
            run("p2", "succeeded", trigger="command", applied=["0004"], duration_ms=300),
            run("p3", "succeeded", trigger="command", applied=[], duration_ms=2_000),
            run("p1", "succeeded", trigger="command", applied=["0001"], duration_ms=20_000),
            run("p2", "succeeded", trigger="command", kind="downgrade", applied=["0004"]),
            run("m1", "queued"),
            run("m3", "queued"),
            run("p3", "running"),
        ]
    )
    now = timezone.now()
    # created_at is auto_now_add: age the queued runs afterwards.
    MigrationRun.objects.filter(target=t["m1"], status="queued").update(
        created_at=now - datetime.timedelta(minutes=20)
    )
    MigrationRun.objects.filter(target=t["m3"], status="queued").update(
        created_at=now - datetime.timedelta(minutes=2)
    )
    return t


def test_runs_by_status_provider_region_trigger_and_kind(client, fleet):
    samples = scrape(client)
    runs = "tenant_migrations_runs_total"
    failed_eu = {
        labels: n
        for labels, n in samples[runs].items()
        if dict(labels)["status"] == "failed" and dict(labels)["region"] == "eu"
    }
    assert sum(failed_eu.values()) == 4
    assert (
        value(
            samples,
            runs,
            status="failed",
            provider="mysql",
            region="eu",
            trigger="admin",
            kind="upgrade",
        )
        == 3
    )
    assert (
        value(
            samples,
            runs,
            status="failed",
            provider="mysql",
            region="eu",
            trigger="signal",
            kind="upgrade",
        )
        == 1
    )
    assert (
        value(
            samples,
            runs,
            status="succeeded",
            provider="postgresql",
            region="us",
            trigger="command",
            kind="upgrade",
        )
        == 4
    )
    # Queued and running runs are not finished: gauges, not this counter.
    assert {dict(labels)["status"] for labels in samples[runs]} == {"failed", "succeeded"}


def test_revisions_applied_sums_the_applied_lists(client, fleet):
    samples = scrape(client)
    applied = "tenant_migrations_revisions_applied_total"
    assert value(samples, applied, provider="postgresql", region="us", kind="upgrade") == 4
    assert value(samples, applied, provider="postgresql", region="us", kind="downgrade") == 1
    assert value(samples, applied, provider="mysql", region="eu", kind="upgrade") == 0


def test_run_duration_histogram(client, fleet):
    samples = scrape(client)
    us = {"provider": "postgresql", "region": "us", "kind": "upgrade"}
    buckets = {
        le: value(samples, "tenant_migrations_run_duration_seconds_bucket", le=le, **us)
        for le in ("0.1", "0.5", "1.0", "5.0", "15.0", "60.0", "300.0", "900.0", "3600.0", "+Inf")
    }
    assert buckets == {
        "0.1": 1,
        "0.5": 2,
        "1.0": 2,
        "5.0": 3,
        "15.0": 3,
        "60.0": 4,
        "300.0": 4,
        "900.0": 4,
        "3600.0": 4,
        "+Inf": 4,
    }
    assert value(samples, "tenant_migrations_run_duration_seconds_count", **us) == 4
    assert value(samples, "tenant_migrations_run_duration_seconds_sum", **us) == pytest.approx(
        22.35
    )
    # Runs without a recorded duration (the downgrade, the unreachable database) are left out.
    eu = {"provider": "mysql", "region": "eu", "kind": "upgrade"}
    assert value(samples, "tenant_migrations_run_duration_seconds_count", **eu) == 3
    assert value(samples, "tenant_migrations_run_duration_seconds_bucket", le="0.1", **eu) == 3
    assert ("postgresql", "us", "downgrade") not in {
        (d["provider"], d["region"], d["kind"])
        for d in map(dict, samples["tenant_migrations_run_duration_seconds_count"])
    }


def test_targets_by_status_behind_head_and_drifted(client, fleet):
    samples = scrape(client)
    targets = "tenant_migrations_targets"
    assert value(samples, targets, status="failed", provider="mysql", region="eu") == 1
    assert value(samples, targets, status="up_to_date", provider="postgresql", region="us") == 2
    # Every status has a series for every provider and region in use, zeros included.
    assert value(samples, targets, status="held", provider="mysql", region="eu") == 0
    assert len(samples[targets]) == 2 * 6

    behind = "tenant_migrations_targets_behind_head"
    assert value(samples, behind, provider="mysql", region="eu") == 3  # OLD, OLD, never checked
    assert value(samples, behind, provider="postgresql", region="us") == 0
    drifted = "tenant_migrations_targets_drifted"
    assert value(samples, drifted, provider="postgresql", region="us") == 1
    assert value(samples, drifted, provider="mysql", region="eu") == 0
    assert value(samples, "tenant_migrations_head_info", revision=HEAD) == 1


def test_vault_errors_by_kind(client, fleet):
    samples = scrape(client)
    errors = samples["tenant_migrations_vault_errors_total"]
    by_kind = {dict(labels)["kind"]: n for labels, n in errors.items()}
    assert by_kind["vault_unavailable"] == 2
    assert by_kind["secret_not_found"] == 1
    # Every Vault error kind has a series before its first error; database errors are not here.
    assert by_kind["vault_forbidden"] == 0
    assert by_kind["secret_incomplete"] == 0
    assert "database_unreachable" not in by_kind


def test_queue_depth_oldest_queued_age_and_runs_in_progress(client, fleet):
    samples = scrape(client)
    assert value(samples, "tenant_migrations_queue_depth", region="eu") == 2
    assert value(samples, "tenant_migrations_queue_depth", region="us") == 0
    age = value(samples, "tenant_migrations_oldest_queued_run_age_seconds", region="eu")
    assert 20 * 60 <= age < 21 * 60
    assert value(samples, "tenant_migrations_oldest_queued_run_age_seconds", region="us") == 0
    assert value(samples, "tenant_migrations_runs_in_progress", region="us") == 1
    assert value(samples, "tenant_migrations_runs_in_progress", region="eu") == 0


def test_a_run_recorded_after_a_scrape_shows_in_the_next_one(client, fleet):
    """Nothing is cached in the web process: a run finished by a worker elsewhere counts at once."""
    labels = dict(status="failed", provider="mysql", region="eu", trigger="admin", kind="upgrade")
    assert value(scrape(client), "tenant_migrations_runs_total", **labels) == 3
    MigrationRun.objects.filter(target=fleet["m1"], status="queued").update(
        status="failed", error_code="vault_forbidden"
    )
    samples = scrape(client)
    assert value(samples, "tenant_migrations_runs_total", **labels) == 4
    assert value(samples, "tenant_migrations_vault_errors_total", kind="vault_forbidden") == 1
    assert value(samples, "tenant_migrations_queue_depth", region="eu") == 1


def test_an_empty_control_plane_scrapes(client):
    samples = scrape(client)
    assert "tenant_migrations_runs_total" not in samples
    assert value(samples, "tenant_migrations_vault_errors_total", kind="vault_unavailable") == 0


def test_unreadable_script_directory_leaves_out_only_behind_head(client, fleet, settings):
    settings.TENANT_MIGRATIONS_DIR = "/nonexistent/tenant_migrations"
    samples = scrape(client)
    assert "tenant_migrations_targets_behind_head" not in samples
    assert "tenant_migrations_head_info" not in samples
    assert value(samples, "tenant_migrations_queue_depth", region="eu") == 2


def test_token_required_when_set(client, fleet, settings):
    settings.METRICS_TOKEN = "s3cret-metrics-token"  # noqa: S105
    url = reverse("metrics")
    response = client.get(url)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"tenant_migrations" not in response.content
    assert client.get(url, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert (
        client.get(url, headers={"Authorization": "Basic s3cret-metrics-token"}).status_code == 401
    )
    samples = scrape(client, Authorization="Bearer s3cret-metrics-token")
    assert value(samples, "tenant_migrations_queue_depth", region="eu") == 2


def test_open_without_a_token(client, fleet):
    assert client.get(reverse("metrics")).status_code == 200


def test_only_get(client):
    assert client.post(reverse("metrics")).status_code == 405


def test_bounded_queries_with_ten_thousand_runs(client, django_assert_max_num_queries):
    regions, providers = ["eu", "us", "ap"], ["postgresql", "mysql", "sqlserver"]
    targets = MigrationTarget.objects.bulk_create(
        MigrationTarget(
            name=f"t{i:04d}",
            kind="dedicated",
            provider=providers[i % 3],
            region=regions[(i // 3) % 3],
            vault_path=f"t{i:04d}",
            status="up_to_date" if i % 10 else "behind",
            revision=HEAD if i % 10 else OLD,
        )
        for i in range(1_000)
    )
    statuses = ["succeeded"] * 7 + ["failed", "skipped", "interrupted"]
    MigrationRun.objects.bulk_create(
        (
            MigrationRun(
                target=targets[i % 1_000],
                trigger=["admin", "command", "api", "schedule"][i % 4],
                status=statuses[i % 10],
                error_code="vault_unavailable" if statuses[i % 10] == "failed" else "",
                applied=["0003", "0004"] if statuses[i % 10] == "succeeded" else [],
                duration_ms=(i * 37) % 4_000_000,
            )
            for i in range(10_000)
        ),
        batch_size=2_000,
    )
    MigrationRun.objects.bulk_create(
        MigrationRun(target=targets[i], trigger="admin", status="queued") for i in range(100)
    )

    # 5, and 1 the first time a process reads these heads: the stored statuses checked against
    # them (tenants.actions.current_heads).
    with django_assert_max_num_queries(6):
        samples = scrape(client)

    assert sum(samples["tenant_migrations_runs_total"].values()) == 10_000
    assert sum(samples["tenant_migrations_revisions_applied_total"].values()) == 7_000 * 2
    assert sum(samples["tenant_migrations_run_duration_seconds_count"].values()) == 10_000
    assert value(samples, "tenant_migrations_vault_errors_total", kind="vault_unavailable") == 1_000
    assert sum(samples["tenant_migrations_targets_behind_head"].values()) == 100
    assert sum(samples["tenant_migrations_queue_depth"].values()) == 100


def test_the_docs_and_alert_rules_name_only_metrics_that_exist(client, fleet):
    """docs/alerts.yml and docs/monitoring.md refer to metrics a scrape really has."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    families = {
        family.name
        for family in text_string_to_metric_families(
            client.get(reverse("metrics")).content.decode()
        )
    }
    exposed = set(scrape(client)) | families
    for doc in ("alerts.yml", "monitoring.md"):
        named = set(re.findall(r"\btenant_migrations_\w+", (docs / doc).read_text()))
        assert named, doc
        assert named <= exposed, (doc, named - exposed)
    table = (docs / "monitoring.md").read_text()
    for family in families:
        assert f"`{family.removeprefix('tenant_migrations_')}" in table, family
