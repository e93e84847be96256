"""Tenants come from the SaaS's provisioning: POST /api/tenants/ takes the provisioning event
with a real API token, registers the tenant and queues its first migration; the same event again
is a 200 that creates nothing, a conflicting one a 409 saying what differs; lists, reads, updates
and decommissioning of tenants and targets; the OpenAPI schema and its docs page."""

import re

import pytest
from django.test import Client

EVENT = {
    "tenant_id": "acme",
    "name": "Acme Corp",
    "database_strategy": "Dedicated",
    "database_provider": "PostgreSQL",
    "region": "eu",
    "vault_path": "tenants/acme",
    "database_created": True,
}


def _token(django_user_model, name, *codenames):
    from django.contrib.auth.models import Permission
    from knox.models import AuthToken

    user = django_user_model.objects.create_user(name)
    for codename in codenames:
        user.user_permissions.add(Permission.objects.get(codename=codename))
    return AuthToken.objects.create(user=user)[1]


@pytest.fixture
def registrar(django_user_model):
    """A client with a real token of a user who may register tenants."""
    token = _token(django_user_model, "provisioning", "register_tenants")
    return Client(headers={"Authorization": f"Bearer {token}"}, raise_request_exception=False)


def post(client, url, body):
    return client.post(url, body, content_type="application/json")


@pytest.mark.django_db
def test_the_provisioning_event_registers_the_tenant_and_queues_its_first_migration(registrar):
    from tenants.models import MigrationRun, MigrationTarget, Tenant

    response = post(registrar, "/api/tenants/", EVENT)
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["created"] is True
    assert body["tenant"]["tenant_id"] == "acme"
    assert body["tenant"]["database_provider"] == "postgresql"
    assert body["tenant"]["target"] == "acme"
    assert body["tenant"]["vault_path"] == "tenants/acme"
    assert body["run"]["status"] == "queued"
    assert body["run"]["trigger"] == "api"
    assert body["run"]["triggered_by"] == "provisioning"
    target = MigrationTarget.objects.get(name="acme")
    assert (target.kind, target.provider, target.region) == ("dedicated", "postgresql", "eu")
    assert Tenant.objects.get(pk="acme").target == target
    assert list(MigrationRun.objects.values_list("id", flat=True)) == [body["run"]["id"]]

    # The same event again: 200, nothing more created, the same run shown.
    again = post(registrar, "/api/tenants/", EVENT)
    assert again.status_code == 200, again.content
    assert again.json()["created"] is False
    assert again.json()["run"]["id"] == body["run"]["id"]
    assert MigrationRun.objects.count() == 1
    assert MigrationTarget.objects.count() == 1

    # A conflicting one: 409 naming what differs; nothing changes.
    conflict = post(registrar, "/api/tenants/", {**EVENT, "database_provider": "mysql"})
    assert conflict.status_code == 409, conflict.content
    assert conflict.json()["differences"] == {
        "database_provider": {"registered": "postgresql", "event": "mysql"}
    }
    assert "database_provider is 'postgresql', the event says 'mysql'" in conflict.json()["detail"]
    assert MigrationTarget.objects.get(name="acme").provider == "postgresql"


@pytest.mark.django_db
def test_a_shared_tenant_joins_its_regions_shared_database_created_if_missing(registrar):
    from tenants.models import MigrationRun, MigrationTarget

    event = {**EVENT, "tenant_id": "small", "database_strategy": "shared", "vault_path": ""}
    first = post(registrar, "/api/tenants/", event)
    assert first.status_code == 201, first.content
    assert first.json()["tenant"]["target"] == "shared-eu"
    shared = MigrationTarget.objects.get(name="shared-eu")
    assert (shared.kind, shared.vault_path) == ("shared", "shared-eu")
    assert first.json()["run"]["target"] == "shared-eu"

    second = post(registrar, "/api/tenants/", {**event, "tenant_id": "small-2"})
    assert second.status_code == 201, second.content
    assert second.json()["tenant"]["target"] == "shared-eu"
    # The shared database's run, already queued, is the one shown: no second run.
    assert second.json()["run"]["id"] == first.json()["run"]["id"]
    assert MigrationRun.objects.count() == 1
    assert MigrationTarget.objects.filter(kind="shared").count() == 1

    mismatch = post(
        registrar, "/api/tenants/", {**event, "tenant_id": "small-3", "database_provider": "mysql"}
    )
    assert mismatch.status_code == 409, mismatch.content
    assert "shared-eu) is postgresql; the event says mysql" in mismatch.json()["detail"]


@pytest.mark.django_db
def test_database_not_created_registers_without_a_run_until_the_event_says_so(registrar):
    from tenants.models import MigrationRun

    event = {**EVENT, "database_created": False}
    first = post(registrar, "/api/tenants/", event)
    assert first.status_code == 201, first.content
    assert first.json()["run"] is None
    assert "database_created is false" in first.json()["detail"]
    assert not MigrationRun.objects.exists()

    created = post(registrar, "/api/tenants/", {**event, "database_created": True})
    assert created.status_code == 200, created.content
    assert created.json()["run"]["status"] == "queued"
    assert MigrationRun.objects.count() == 1


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"database_strategy": "pooled"}, "database_strategy", "shared, dedicated, external"),
        ({"database_provider": "oracle"}, "database_provider", "postgresql, sqlserver, mysql"),
        ({"tenant_id": "Acme Corp"}, "tenant_id", "lower-case letters"),
        ({"region": "EU West"}, "region", "lower-case letters"),
        ({"vault_path": "../x"}, "vault_path", "segments of letters"),
        ({"name": ""}, "name", "may not be blank"),
        ({"database_created": "perhaps"}, "database_created", "valid boolean"),
    ],
)
def test_invalid_events_are_a_400_naming_the_field_and_what_is_allowed(
    registrar, change, field, words
):
    from tenants.models import MigrationTarget, Tenant

    response = post(registrar, "/api/tenants/", {**EVENT, **change})
    assert response.status_code == 400, response.content
    assert list(response.json()) == [field]
    assert words in " ".join(response.json()[field])
    assert not Tenant.objects.exists()
    assert not MigrationTarget.objects.exists()


@pytest.mark.django_db
def test_registration_needs_its_own_permission(django_user_model):
    from tenants.models import Tenant

    anonymous = post(Client(), "/api/tenants/", EVENT)
    assert anonymous.status_code == 401, anonymous.content

    token = _token(django_user_model, "operator", "run_migrations")
    operator = Client(headers={"Authorization": f"Bearer {token}"})
    refused = post(operator, "/api/tenants/", EVENT)
    assert refused.status_code == 403, refused.content
    assert "tenants.register_tenants" in refused.json()["detail"]
    assert not Tenant.objects.exists()
    # Reading the list is allowed to an operator.
    assert operator.get("/api/tenants/").status_code == 200


@pytest.mark.django_db
def test_lists_are_paginated_and_filtered(registrar):
    for n in range(5):
        event = {**EVENT, "tenant_id": f"t-{n}", "vault_path": "", "database_created": False}
        if n % 2:
            event.update(database_strategy="shared", region="us")
        if n == 4:
            event.update(database_provider="mysql")
        assert post(registrar, "/api/tenants/", event).status_code == 201

    page = registrar.get("/api/tenants/?page_size=2").json()
    assert page["count"] == 5
    assert [t["tenant_id"] for t in page["results"]] == ["t-0", "t-1"]
    assert page["next"].endswith("page=2&page_size=2")

    def ids(query):
        response = registrar.get(f"/api/tenants/?{query}")
        assert response.status_code == 200, response.content
        return [t["tenant_id"] for t in response.json()["results"]]

    assert ids("strategy=shared") == ["t-1", "t-3"]
    assert ids("provider=mysql") == ["t-4"]
    assert ids("region=eu") == ["t-0", "t-2", "t-4"]
    assert ids("status=unknown&strategy=dedicated") == ["t-0", "t-2", "t-4"]
    wrong = registrar.get("/api/tenants/?provider=oracle")
    assert wrong.status_code == 400
    assert "use one of postgresql" in wrong.json()["provider"]

    targets = registrar.get("/api/targets/?strategy=shared").json()
    assert [(t["name"], t["tenants"]) for t in targets["results"]] == [("shared-us", 2)]


@pytest.mark.django_db
def test_update_read_and_decommission_a_tenant(registrar):
    from tenants import planning
    from tenants.models import MigrationRun, MigrationTarget

    created = post(registrar, "/api/tenants/", EVENT).json()
    run_id = created["run"]["id"]

    patched = registrar.patch(
        "/api/tenants/acme", {"name": "Acme Inc", "vault_path": "v2/acme"}, "application/json"
    )
    assert patched.status_code == 200, patched.content
    assert patched.json()["name"] == "Acme Inc"
    assert patched.json()["vault_path"] == "v2/acme"
    moved = registrar.patch("/api/tenants/acme", {"region": "us"}, "application/json")
    assert moved.status_code == 400
    assert "region cannot be changed here: PATCH takes name" in moved.json()["region"][0]
    assert registrar.get("/api/tenants/acme").json()["region"] == "eu"

    retired = registrar.post("/api/tenants/acme/decommission")
    assert retired.status_code == 200, retired.content
    assert retired.json()["decommissioned"] is True
    # Its queued run was cancelled; its history is kept.
    assert MigrationRun.objects.get(pk=run_id).status == "cancelled"
    target = MigrationTarget.objects.get(name="acme")
    assert target.decommissioned_at is not None
    # No more runs: the planner refuses, saying why, and so does the migrate endpoint.
    [row] = planning.plan([target], planning.Intent.upgrade())
    assert "decommissioned" in row.refusal
    assert registrar.get("/api/tenants/?status=decommissioned").json()["count"] == 1

    again = registrar.post("/api/tenants/acme/decommission")
    assert again.status_code == 409
    assert "already decommissioned" in again.json()["detail"]


@pytest.mark.django_db
def test_migrating_a_decommissioned_tenant_is_refused_with_the_reason(django_user_model):
    token = _token(django_user_model, "ops", "register_tenants", "run_migrations")
    client = Client(headers={"Authorization": f"Bearer {token}"})
    assert post(client, "/api/tenants/", {**EVENT, "database_created": False}).status_code == 201
    assert client.post("/api/tenants/acme/decommission").status_code == 200
    refused = client.post("/api/tenants/acme/migrate")
    assert refused.status_code == 409, refused.content
    assert "decommissioned" in refused.json()["reason"]


@pytest.mark.django_db
def test_targets_create_update_and_decommission(registrar):
    created = post(
        registrar,
        "/api/targets/",
        {"name": "shared-ap", "kind": "shared", "provider": "mysql", "region": "ap"},
    )
    assert created.status_code == 201, created.content
    assert created.json()["vault_path"] == "shared-ap"
    second = post(
        registrar,
        "/api/targets/",
        {"name": "shared-ap2", "kind": "shared", "provider": "mysql", "region": "ap"},
    )
    assert second.status_code == 400
    assert "already has a shared database: shared-ap" in str(second.json()), second.json()

    changed = registrar.patch(
        "/api/targets/shared-ap", {"backup_policy": "on"}, content_type="application/json"
    )
    assert changed.status_code == 200, changed.content
    assert changed.json()["backup_policy"] == "on"

    joined = post(
        registrar,
        "/api/tenants/",
        {
            **EVENT,
            "database_strategy": "shared",
            "database_provider": "mysql",
            "region": "ap",
            "vault_path": "",
        },
    )
    assert joined.status_code == 201, joined.content
    refused = registrar.post("/api/targets/shared-ap/decommission")
    assert refused.status_code == 409
    assert "still holds tenant(s) acme" in refused.json()["detail"]
    assert registrar.post("/api/tenants/acme/decommission").status_code == 200
    retired = registrar.post("/api/targets/shared-ap/decommission")
    assert retired.status_code == 200, retired.content
    assert retired.json()["decommissioned"] is True


@pytest.mark.django_db
def test_the_schema_and_its_docs_page_are_served_without_a_cdn():
    client = Client()
    schema = client.get("/api/schema/?format=json")
    assert schema.status_code == 200, schema.content
    paths = schema.json()["paths"]
    assert "/api/tenants/" in paths
    assert "post" in paths["/api/tenants/"]
    assert "/api/targets/{name}/decommission" in paths
    docs = client.get("/api/docs/")
    assert docs.status_code == 200
    html = docs.content.decode()
    assert "swagger-ui" in html
    assert "drf_spectacular_sidecar" in html
    assert "cdn" not in html.lower() and "https://" not in html
    # Its scripts and styles come from the control plane itself.
    assets = re.findall(r'(?:src|href)="(/static/drf_spectacular_sidecar/[^"]+)"', html)
    assert any(a.endswith(".js") for a in assets), assets
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
