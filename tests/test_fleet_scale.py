"""The pages an operator opens on a large fleet answer in a number of queries that does not grow
with it: the fleet dashboard, the admin's changelists, /metrics and /readyz make as many queries
at 400 targets as at 10, each target a tenant's with finished runs and a queued one, and no more
than their budget (issue 23 counted 11, 6, 5 and 1 at 10,000 targets; an admin's session and
user are counted here too). Their times at 10,000 targets are measured by
``bench/fleet.py --register 10000``, not here."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from tenants.models import MigrationRun, MigrationTarget, Tenant
from tests.dispatch_fixtures import HEAD

pytestmark = pytest.mark.django_db

# page: (URL name, query string, queries allowed, what the page shows of a 400-target fleet)
PAGES = {
    "dashboard": ("fleet-dashboard", "", 12, b"400"),
    "targets": ("admin:tenants_migrationtarget_changelist", "", 6, b"400 migration targets"),
    "runs": ("admin:tenants_migrationrun_changelist", "", 7, b"1200 migration runs"),
    "tenants": ("admin:tenants_tenant_changelist", "", 5, b"400 tenants"),
    "metrics": (
        "metrics",
        "",
        5,
        b'tenant_migrations_targets{provider="mysql",region="us",status="up_to_date"} 200.0',
    ),
    "readyz": ("readyz", "?format=json", 3, b'"up_to_date": 400'),
}


def grow(size):
    """Add dedicated tenants, each with its own target at head, a succeeded and a failed run
    and a queued one, until the fleet has ``size``."""
    have = MigrationTarget.objects.count()
    targets = MigrationTarget.objects.bulk_create(
        MigrationTarget(
            name=f"t{i:04d}",
            kind="dedicated",
            provider=("postgresql", "mysql")[i % 2],
            region=("eu", "us")[i % 2],
            vault_path=f"t{i:04d}",
            revision=HEAD,
            status="up_to_date",
        )
        for i in range(have, size)
    )
    Tenant.objects.bulk_create(
        Tenant(id=t.name, name=f"Tenant {t.name}", strategy="dedicated", target=t) for t in targets
    )
    MigrationRun.objects.bulk_create(
        MigrationRun(target=t, trigger="command", status=status)
        for t in targets
        for status in ("succeeded", "failed", "queued")
    )


def counted_get(client, url):
    """The page's response and its queries, once the process has read what it reads once (the
    heads on disk, the admin's site)."""
    client.get(url)
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return response, len(queries.captured_queries)


@pytest.mark.parametrize("page", PAGES)
def test_a_page_makes_as_many_queries_at_400_targets_as_at_10(
    admin_client, page, django_assert_max_num_queries
):
    name, query, budget, shown = PAGES[page]
    url = reverse(name) + query
    grow(10)
    _, small = counted_get(admin_client, url)

    grow(400)
    admin_client.get(url)
    with django_assert_max_num_queries(budget) as queries:
        response = admin_client.get(url)

    assert response.status_code == 200
    assert shown in response.content, response.content.decode()[:3000]
    assert len(queries.captured_queries) == small
