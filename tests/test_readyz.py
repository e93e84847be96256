"""/readyz: anybody gets the status and the counts; only staff or an API token get the names of
the databases that are not ready."""

import pytest
from django.test import Client

# /readyz runs its checks in a thread of their own: they must see committed rows.
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def fleet_with_a_shared_database_behind(target_factory):
    target_factory(name="shared-eu-secret-name", kind="shared", status="behind")
    target_factory(name="acme-dedicated", status="failed")


@pytest.mark.parametrize("format", ["json", "text", "html"])
def test_an_anonymous_caller_gets_status_and_counts_but_no_names(
    format, fleet_with_a_shared_database_behind
):
    response = Client().get(f"/readyz?format={format}" if format != "html" else "/readyz")
    text = response.content.decode()
    assert response.status_code == 500
    assert "1 shared database(s) not at head" in text
    assert "shared-eu-secret-name" not in text and "acme-dedicated" not in text
    if format == "json":
        body = response.json()
        assert body["status"] == "unavailable"
        assert body["targets"]["behind"] == 1 and body["targets"]["failed"] == 1


def test_a_wrong_token_gets_no_names(fleet_with_a_shared_database_behind):
    for header in (f"Bearer {'0' * 64}", "Bearer ab\x00cd"):
        response = Client(headers={"Authorization": header}).get("/readyz?format=json")
        assert response.status_code == 500
        assert "shared-eu-secret-name" not in response.content.decode()


def test_staff_and_api_tokens_get_the_names(
    admin_client, django_user_model, fleet_with_a_shared_database_behind
):
    from knox.models import AuthToken

    staff = admin_client.get("/readyz?format=json").json()
    assert "shared-eu-secret-name (behind)" in staff["checks"]["DatabaseMigrations"]

    reader = django_user_model.objects.create_user("prober")  # no permission needed
    _, token = AuthToken.objects.create(user=reader)
    with_token = Client(headers={"Authorization": f"Bearer {token}"}).get("/readyz?format=text")
    assert "shared-eu-secret-name (behind)" in with_token.content.decode()

    not_staff = Client()
    not_staff.force_login(reader)
    assert "shared-eu-secret-name" not in not_staff.get("/readyz").content.decode()
