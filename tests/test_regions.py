"""Multi-region: each region's runs go to its own named django-q2 cluster (Redis broker), and a
region no cluster serves is reported instead of queued forever."""

import json
import secrets

import pytest

from tenants.models import MigrationRun
from tests.dispatch_fixtures import HEAD
from tests.workers import manage, process_env, qcluster

pytestmark = [pytest.mark.vault, pytest.mark.redis, pytest.mark.slow]


@pytest.mark.django_db(transaction=True)
def test_each_region_is_migrated_by_its_own_cluster(registered_tenant, redis_url, tmp_path):
    suffix = secrets.token_hex(3)
    clusters = {"eu": f"cp-eu-{suffix}", "us": f"cp-us-{suffix}"}
    routing = ",".join(f"{region}={name}" for region, name in clusters.items())
    eu = [registered_tenant("postgresql", region="eu") for _ in range(2)]
    us = [registered_tenant("mysql", region="us"), registered_tenant("postgresql", region="us")]
    nowhere = registered_tenant("postgresql", region="ap")

    env = process_env(REDIS_URL=redis_url, REGION_CLUSTERS=routing)
    with (
        qcluster({**env, "Q_CLUSTER_NAME": clusters["eu"]}, tmp_path / "eu.log"),
        qcluster({**env, "Q_CLUSTER_NAME": clusters["us"]}, tmp_path / "us.log"),
    ):
        result = manage("migrate_tenants", "--all", "--wait", "--json", "--timeout", "30", env=env)
    # One selected target could not be queued (its region has no cluster): said, and exit 1.
    assert result.returncode == 1, result.stdout + result.stderr
    outcomes = {row["target"]: row for row in json.loads(result.stdout)}

    for region, tenants in (("eu", eu), ("us", us)):
        for tenant in tenants:
            run = MigrationRun.objects.get(target=tenant.target)
            assert run.status == "succeeded", run.error
            assert run.revision_after == HEAD
            assert run.worker_cluster == clusters[region]
    # The worker logs agree: each cluster ran only its own region's targets.
    eu_log, us_log = (tmp_path / "eu.log").read_text(), (tmp_path / "us.log").read_text()
    assert all(t.target.name in eu_log and t.target.name not in us_log for t in eu)
    assert all(t.target.name in us_log and t.target.name not in eu_log for t in us)

    # A region without a cluster: reported, nothing queued.
    assert outcomes[nowhere.target.name]["status"] == "not-queued"
    assert "no worker cluster serves region 'ap'" in outcomes[nowhere.target.name]["error"]
    assert not MigrationRun.objects.filter(target=nowhere.target).exists()
