"""Guessing is bounded: API tokens (429 after API_THROTTLE_ANON), a user's request rate
(API_THROTTLE_USER), and admin passwords (429 after ADMIN_LOGIN_FAILURE_LIMIT failures)."""

import pytest
from django.test import Client


@pytest.fixture
def token(django_user_model):
    from django.contrib.auth.models import Permission
    from knox.models import AuthToken

    operator = django_user_model.objects.create_user("operator")
    operator.user_permissions.add(Permission.objects.get(codename="run_migrations"))
    return AuthToken.objects.create(user=operator)[1]


@pytest.mark.django_db
def test_guessing_api_tokens_is_refused_with_429_after_the_anonymous_rate(
    settings, token, tenant_factory
):
    settings.API_THROTTLE_ANON = "3/min"
    tenant = tenant_factory(auto_migrate=False)
    url = f"/api/tenants/{tenant.id}/migrate"
    guesser = Client()
    statuses = [
        guesser.post(url, headers={"Authorization": f"Bearer {'0' * 63}{n}"}).status_code
        for n in range(3)
    ]
    assert statuses == [401, 401, 401]
    refused = guesser.post(url, headers={"Authorization": f"Bearer {'1' * 64}"})
    assert refused.status_code == 429
    assert "throttled" in refused.json()["detail"]
    assert 0 < int(refused["Retry-After"]) <= 60
    # No token at all counts the same; the right token still works from that address.
    assert guesser.post(url).status_code == 429
    assert guesser.post(url, headers={"Authorization": f"Bearer {token}"}).status_code == 202


@pytest.mark.django_db
def test_a_user_over_the_user_rate_gets_429(settings, token, tenant_factory):
    settings.API_THROTTLE_USER = "2/min"
    tenant = tenant_factory(auto_migrate=False)
    api = Client(headers={"Authorization": f"Bearer {token}"})
    run = api.post(f"/api/tenants/{tenant.id}/migrate").json()
    assert api.get(f"/api/runs/{run['id']}").status_code == 200
    assert api.get(f"/api/runs/{run['id']}").status_code == 429


@pytest.mark.django_db
def test_empty_rates_mean_no_bound(settings, tenant_factory):
    settings.API_THROTTLE_ANON = ""
    tenant = tenant_factory(auto_migrate=False)
    client = Client()
    assert {client.post(f"/api/tenants/{tenant.id}/migrate").status_code for _ in range(30)} == {
        401
    }


@pytest.mark.django_db
def test_admin_login_is_refused_with_429_after_the_failure_limit(settings, django_user_model):
    settings.ADMIN_LOGIN_FAILURE_LIMIT = 3
    django_user_model.objects.create_superuser("boss", "boss@example.com", "right-password-1")
    django_user_model.objects.create_superuser("other", "other@example.com", "right-password-2")
    browser = Client()

    def login(username, password):
        return browser.post(
            "/admin/login/?next=/admin/", {"username": username, "password": password}
        )

    for attempt in range(3):
        failed = login("boss", f"guess-{attempt}")
        assert failed.status_code == 200
        assert "Please enter the correct username and password" in failed.content.decode()
    refused = login("boss", "right-password-1")  # even the right password, now
    assert refused.status_code == 429
    assert "Too many failed logins for boss" in refused.content.decode()
    assert int(refused["Retry-After"]) == settings.ADMIN_LOGIN_LOCKOUT_SECONDS
    assert login("BOSS", "guess").status_code == 429  # user names count case-insensitively
    # Another user from the same address is not locked out.
    assert login("other", "right-password-2").status_code == 302


@pytest.mark.django_db
def test_a_successful_admin_login_forgets_earlier_failures(settings, django_user_model):
    settings.ADMIN_LOGIN_FAILURE_LIMIT = 3
    django_user_model.objects.create_superuser("boss", "boss@example.com", "right-password-1")
    browser = Client()

    def login(password):
        return browser.post("/admin/login/", {"username": "boss", "password": password})

    assert [login(p).status_code for p in ("a", "b")] == [200, 200]
    assert login("right-password-1").status_code == 302
    browser.logout()
    assert [login(p).status_code for p in ("c", "d", "e")] == [200, 200, 200]
    assert login("f").status_code == 429
