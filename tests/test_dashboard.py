"""The fleet dashboard at /admin/fleet/: where every target stands, what runs now, what failed
last; the same handful of queries with ten thousand targets as with ten."""

import re
import uuid

import pytest
from django.urls import reverse

from tenants.models import MigrationRun, MigrationTarget
from tests.dispatch_fixtures import HEAD

pytestmark = pytest.mark.django_db

OLD = "0002_projects"
NOT_FOUND = (
    "No secret at secret/data/database/{name} in Vault http://127.0.0.1:8200. Create it with: "
    "vault kv put secret/database/{name} admin_username=... admin_password=..."
)


@pytest.fixture
def big_fleet():
    """10,000 targets over two regions and three providers, most at head, some behind or failed;
    a batch of 40 runs under way (25 done, 3 of them failed), and older failures."""

    def status_of(i):
        if i % 100 == 0:
            return "failed", OLD
        if i % 10 == 0:
            return "behind", OLD
        if i % 997 == 0:
            return "unknown", ""
        return "up_to_date", HEAD

    providers = ["postgresql", "mysql", "sqlserver"]
    targets = MigrationTarget.objects.bulk_create(
        MigrationTarget(
            name=f"t{i:05d}",
            kind="dedicated",
            provider=providers[i % 3],
            region="eu" if i % 2 else "us",
            vault_path=f"t{i:05d}",
            revision=status_of(i)[1],
            status=status_of(i)[0],
        )
        for i in range(10_000)
    )
    batch = uuid.uuid4()
    statuses = ["succeeded"] * 22 + ["failed"] * 3 + ["running"] * 5 + ["queued"] * 10
    runs = MigrationRun.objects.bulk_create(
        MigrationRun(
            target=targets[i],
            trigger="admin",
            batch=batch,
            status=status,
            error=NOT_FOUND.format(name=targets[i].name) if status == "failed" else "",
        )
        for i, status in enumerate(statuses)
    )
    return {"targets": targets, "runs": runs, "batch": batch}


def fleet_page(client, django_assert_max_num_queries, queries=14):  # 2 for the rollouts
    with django_assert_max_num_queries(queries):
        response = client.get(reverse("fleet-dashboard"))
    assert response.status_code == 200
    return response.content.decode()


def section(html, element_id):
    """The HTML of the dashboard's card ``element_id``, tags kept, whitespace squeezed."""
    match = re.search(rf'<div class="[^"]*" id="{element_id}">(.*?)\n</div>', html, re.S)
    assert match, f"no #{element_id} on the page"
    return " ".join(match.group(1).split())


def table_rows(html):
    """The text of each cell, row by row."""
    return [
        [
            re.sub(r"<[^>]+>", "", cell).strip()
            for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)
        ]
        for row in re.findall(r"<tr>(.*?)</tr>", html)
    ]


def test_ten_thousand_targets_in_a_bounded_number_of_queries(
    admin_client, big_fleet, django_assert_max_num_queries
):
    html = fleet_page(admin_client, django_assert_max_num_queries)
    assert "10000 targets" in html
    # Counts by status, each linking to the targets list filtered on it.
    tiles = section(html, "fleet-status")
    counts = dict(
        (label, int(n))
        for n, label in re.findall(r'<span class="n">(\d+)</span>\s*([^<]+?)\s*</a>', tiles)
    )
    assert counts == {
        "Unknown": 9,
        "Up to date": 8991,
        "Behind": 900,
        "Migrating": 0,
        "Failed": 100,
        "Held": 0,
    }
    assert sum(counts.values()) == 10_000
    assert "?status__exact=failed" in tiles


def test_revision_chart_marks_the_head(admin_client, big_fleet, django_assert_max_num_queries):
    chart = section(fleet_page(admin_client, django_assert_max_num_queries), "fleet-revisions")
    rows = re.findall(r"<tr>(.*?)</tr>", chart)
    assert HEAD in rows[0] and ">head</span>" in rows[0]  # the most common revision comes first
    assert 'class="bar head"' in rows[0]
    [old] = [row for row in rows if OLD in row]
    assert ">head</span>" not in old and ">1000<" in old
    [none] = [row for row in rows if "(none recorded)" in row]
    assert ">9<" in none
    # Each revision links to its targets.
    assert f"?revision={HEAD}" in rows[0]
    url = re.search(r'href="([^"]+)"', none).group(1).replace("&amp;", "&")
    listed = admin_client.get(url).content.decode()
    assert "9 results" in listed, url


def test_region_and_provider_table(admin_client, big_fleet, django_assert_max_num_queries):
    table = section(fleet_page(admin_client, django_assert_max_num_queries), "fleet-regions")
    rows = table_rows(table)
    assert rows[0] == ["Region", "Provider", "Targets", "Behind", "Failed"]
    assert len(rows) == 1 + 6  # 2 regions x 3 providers
    by_key = {(c[0], c[1]): c[2:] for c in rows[1:]}
    assert set(by_key) == {
        (r, p) for r in ("eu", "us") for p in ("MySQL / MariaDB", "PostgreSQL", "SQL Server")
    }
    # Every behind and failed target sits at an even index: region 'us'.
    assert sum(int(v[0]) for v in by_key.values()) == 10_000
    assert sum(int(v[1]) for k, v in by_key.items() if k[0] == "us") == 900
    assert sum(int(v[2]) for k, v in by_key.items() if k[0] == "eu") == 0
    assert "region__exact=eu" in table and "provider__exact=postgresql" in table


def test_active_runs_and_batch_progress(admin_client, big_fleet, django_assert_max_num_queries):
    html = fleet_page(admin_client, django_assert_max_num_queries)
    active = section(html, "fleet-active")
    assert "In progress (15)" in active
    assert "25 of 40 done, 3 failed" in active
    assert 'title="62% done"' in active  # 25/40, rounded; 3 of them failed:
    assert (
        '<span class="ok" style="width: 54%"></span><span class="failed" style="width: 8%">'
        in active
    )
    for run in big_fleet["runs"][25:]:
        assert f">#{run.pk}<" in active and run.target.name in active
    for run in big_fleet["runs"][:25]:
        assert f">#{run.pk}<" not in active


def test_batches_beyond_the_first_are_shown(admin_client, big_fleet, django_assert_max_num_queries):
    """A newer batch with many runs under way does not hide the older one's progress."""
    targets = big_fleet["targets"]
    second = uuid.uuid4()
    MigrationRun.objects.bulk_create(
        MigrationRun(target=t, trigger="command", batch=second, status="queued")
        for t in targets[100:130]
    )
    active = section(fleet_page(admin_client, django_assert_max_num_queries), "fleet-active")
    assert "0 of 30 done" in active
    assert "25 of 40 done, 3 failed" in active
    assert "In progress (45)" in active


def test_a_retry_keeps_its_target_in_progress(
    admin_client, target_factory, django_assert_max_num_queries
):
    """A failed attempt followed by a queued retry is one target not yet done, not a failure."""
    first, second = target_factory(), target_factory()
    batch = uuid.uuid4()
    MigrationRun.objects.create(target=first, trigger="admin", batch=batch, status="succeeded")
    MigrationRun.objects.create(
        target=second, trigger="admin", batch=batch, status="failed", error="Vault is sealed"
    )
    MigrationRun.objects.create(target=second, trigger="admin", batch=batch, status="queued")
    active = section(fleet_page(admin_client, django_assert_max_num_queries), "fleet-active")
    assert "1 of 2 done" in active
    assert "failed" not in active.split("</p>")[0]


def test_latest_failures_show_their_error(admin_client, big_fleet, django_assert_max_num_queries):
    failures = section(fleet_page(admin_client, django_assert_max_num_queries), "fleet-failures")
    for run in big_fleet["runs"][22:25]:
        assert f">#{run.pk}<" in failures
        assert f"No secret at secret/data/database/{run.target.name}" in failures
        assert f"vault kv put secret/database/{run.target.name}" in failures
    assert "status__exact=failed" in failures


def test_refreshes_itself_only_while_runs_are_active(admin_client, big_fleet):
    url = reverse("fleet-dashboard")
    page = admin_client.get(url).content.decode()
    assert '<meta http-equiv="refresh"' in page
    assert "refreshes itself" in page

    MigrationRun.objects.filter(status__in=["queued", "running"]).update(status="succeeded")
    page = admin_client.get(url).content.decode()
    assert '<meta http-equiv="refresh"' not in page
    assert "refreshes itself" not in page
    assert "In progress (0)" in page and "Nothing is running." in page


def test_keeps_refreshing_while_a_target_is_marked_migrating(admin_client, target_factory):
    """A run that finished while the page was being read leaves a target shown as migrating
    with nothing in progress: the page refreshes once more instead of settling on that."""
    target_factory(status="migrating")
    page = admin_client.get(reverse("fleet-dashboard")).content.decode()
    assert "In progress (0)" in page
    assert '<meta http-equiv="refresh"' in page


def test_empty_fleet(admin_client, django_assert_max_num_queries):
    html = fleet_page(admin_client, django_assert_max_num_queries)
    assert "0 targets" in html
    assert "No targets yet." in html
    assert "No failures." in html


def test_needs_a_staff_login(client, django_user_model):
    url = reverse("fleet-dashboard")
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert "next=/admin/fleet/" in response["Location"]

    user = django_user_model.objects.create_user("customer", password="pw")
    client.force_login(user)
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


def test_admin_index_links_to_the_dashboard(admin_client):
    page = admin_client.get(reverse("admin:index")).content.decode()
    assert f'href="{reverse("fleet-dashboard")}"' in page
    assert "Fleet dashboard" in page
