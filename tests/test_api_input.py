"""Bad input to the HTTP API gets a 400 or 401 that says what is wrong, never a 500; and the
debug error page never shows a credential."""

import http.client
import json
import os
import subprocess
import sys
import time
from urllib.parse import quote

import pytest
from django.test import Client

from tests import services
from tests.test_settings_checks import ROOT

LONG_REVISION = "r" * 65

# (what, path of the tenant, body, content type): each is a 400 for a user with a token.
BAD_REQUESTS = [
    ("a JSON array as body", "{tenant}", "[1, 2]", "application/json"),
    ("a JSON string as body", "{tenant}", '"head"', "application/json"),
    ("a NUL byte in the tenant id", "ab%00cd", "", "application/json"),
    ("a tenant id that cannot be one", "Ab..cd", "", "application/json"),
    ("a revision over 64 characters", "{tenant}", json.dumps({"revision": LONG_REVISION}), None),
    ("a NUL byte in the revision", "{tenant}", json.dumps({"revision": "he\x00ad"}), None),
    ("a revision that is an object", "{tenant}", json.dumps({"revision": {"a": 1}}), None),
]
EXPECTED_FIELD = {
    "a JSON array as body": "non_field_errors",
    "a JSON string as body": "non_field_errors",
    "a NUL byte in the tenant id": "tenant",
    "a tenant id that cannot be one": "tenant",
}


@pytest.fixture
def token(django_user_model):
    from django.contrib.auth.models import Permission
    from knox.models import AuthToken

    operator = django_user_model.objects.create_user("operator")
    operator.user_permissions.add(Permission.objects.get(codename="run_migrations"))
    return AuthToken.objects.create(user=operator)[1]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("what", "path", "body", "content_type"), BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS]
)
def test_bad_input_is_a_400_naming_the_field(what, path, body, content_type, token, tenant_factory):
    from tenants.models import MigrationRun

    tenant = tenant_factory(auto_migrate=False)
    url = f"/api/tenants/{path.format(tenant=tenant.id)}/migrate"
    client = Client(raise_request_exception=False)
    kwargs = {"data": body, "content_type": content_type or "application/json"}

    anonymous = client.post(url, **kwargs)
    assert anonymous.status_code == 401, anonymous.content

    response = client.post(url, headers={"Authorization": f"Bearer {token}"}, **kwargs)
    assert response.status_code == 400, response.content
    errors = response.json()
    assert list(errors) == [EXPECTED_FIELD.get(what, "revision")], errors
    assert not MigrationRun.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "header",
    ["Bearer ab\x00cd", "Bearer \xff\xfe", "Token ab cd", "Bearer", "Bearer " + "a" * 300],
    ids=["NUL byte", "not UTF-8", "two words", "no token", "too long"],
)
def test_malformed_tokens_are_a_401(header, tenant_factory):
    tenant = tenant_factory(auto_migrate=False)
    client = Client(raise_request_exception=False)
    response = client.post(f"/api/tenants/{tenant.id}/migrate", headers={"Authorization": header})
    assert response.status_code == 401, response.content
    assert "Authorization" in response.json()["detail"] or "token" in response.json()["detail"]


@pytest.mark.django_db
def test_a_valid_revision_and_an_empty_body_still_work(token, tenant_factory):
    tenant = tenant_factory(auto_migrate=False)
    api = Client(headers={"Authorization": f"Bearer {token}"})
    response = api.post(
        f"/api/tenants/{tenant.id}/migrate",
        data={"revision": "0002_projects"},
        content_type="application/json",
    )
    assert response.status_code == 202, response.content
    assert response.json()["requested_revision"] == "0002_projects"
    other = tenant_factory(auto_migrate=False)
    response = api.post(f"/api/tenants/{other.id}/migrate")
    assert response.status_code == 202 and response.json()["requested_revision"] == "head"


# --- the same over HTTP, against a PostgreSQL control plane under runserver with DEBUG ----------


def _request(port, method, path, headers=None, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.putrequest(method, path)
        for name, value in (headers or {}).items():
            connection.putheader(name, value.encode("latin-1"))
        data = body.encode() if body is not None else b""
        connection.putheader("Content-Type", "application/json")
        connection.putheader("Content-Length", str(len(data)))
        connection.endheaders(data)
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


@pytest.mark.postgres
def test_bad_input_over_http_to_a_postgresql_control_plane_with_debug(pg_database, tmp_path):
    """What `make demo` and Compose's `web` run: runserver, DEBUG=true; PostgreSQL refuses a NUL
    byte and a revision too long for its column, where SQLite did not mind."""
    db = pg_database()
    redis_password = "redis-" + services.new_password()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "REDIS_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="controlplane.settings",
        DEBUG="true",
        SECRET_KEY="k" * 50,
        VAULT_TOKEN="vault-" + services.new_password(),
        DATA_DIR=str(tmp_path),
        DATABASE_URL=f"postgres://{db.admin_username}:{quote(db.admin_password, safe='')}"
        f"@{db.host}:{db.port}/{db.database}",
        # Only in the environment: a web process never connects to it here.
        VERIFY_SCRATCH_POSTGRES_URL=f"postgres://scratch:{quote(redis_password, safe='')}"
        "@127.0.0.1:1/x",
    )
    secrets = [db.admin_password, redis_password, env["VAULT_TOKEN"]]
    secrets += [quote(secret, safe="") for secret in secrets]

    def manage(*args):
        result = subprocess.run(
            [sys.executable, "manage.py", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    manage("migrate", "-v0")
    manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User;"
        "from tenants.models import MigrationTarget, Tenant;"
        "User.objects.create_superuser('op', 'op@example.com', 'pw-op-not-used');"
        "t = MigrationTarget.objects.create(name='acme', kind='dedicated');"
        "Tenant.objects.create(id='acme', name='Acme', strategy='dedicated', target=t, "
        "auto_migrate=False)",
    )
    token = manage("create_api_token", "op").strip()
    port = services.free_port()
    server = subprocess.Popen(
        [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _request(port, "GET", "/healthz")
                break
            except OSError:
                assert time.monotonic() < deadline, "runserver did not answer"
                time.sleep(0.2)
        auth = {"Authorization": f"Bearer {token}"}
        answers = {
            "NUL in the token": _request(
                port, "POST", "/api/tenants/acme/migrate", {"Authorization": "Bearer ab\x00cd"}
            ),
            "array body": _request(port, "POST", "/api/tenants/acme/migrate", auth, "[1]"),
            "NUL in the tenant id": _request(port, "POST", "/api/tenants/ab%00cd/migrate", auth),
            "long revision": _request(
                port,
                "POST",
                "/api/tenants/acme/migrate",
                auth,
                json.dumps({"revision": LONG_REVISION}),
            ),
            "run id beyond bigint": _request(port, "GET", "/api/runs/99999999999999999999", auth),
        }
        assert {what: status for what, (status, _) in answers.items()} == {
            "NUL in the token": 401,
            "array body": 400,
            "NUL in the tenant id": 400,
            "long revision": 400,
            "run id beyond bigint": 404,
        }
        assert "Ensure this field has no more than 64 characters" in answers["long revision"][1]
        texts = [text for _, text in answers.values()]
        assert not [s for s in secrets for text in texts if s in text]
        # The good request still goes through.
        status, text = _request(port, "POST", "/api/tenants/acme/migrate", auth)
        assert status == 202, text
    finally:
        server.terminate()
        server.wait(timeout=20)


# --- the DEBUG error page ---------------------------------------------------------------------


def test_debug_error_page_shows_no_credential(rf, settings, monkeypatch):
    from django.views.debug import technical_500_response

    database_password = "db-" + services.new_password()
    redis_password = "redis-" + services.new_password()
    vault_token = "hvs." + services.new_password()
    secret_id = "sid-" + services.new_password()
    scratch_password = "scratch-" + services.new_password()
    # As written in a URL (percent-encoded), and carelessly (not encoded: '@', '/' and ':' in it).
    database_url = (
        f"postgres://controlplane:{quote(database_password, safe='')}@db.internal:5432/cp"
    )
    redis_url = f"redis://:{redis_password}@redis.internal:6379/0"
    settings.DEBUG = True
    settings.REDIS_URL = redis_url
    settings.Q_CLUSTER = {**settings.Q_CLUSTER, "redis": redis_url}
    settings.VAULT_TOKEN = vault_token
    settings.VAULT_SECRET_ID = secret_id
    settings.VERIFY_SCRATCH_POSTGRES_URL = (
        f"postgresql://scratch:{scratch_password}@scratch.internal/postgres"
    )
    # runserver puts the whole process environment in request.META.
    environment = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "VAULT_TOKEN": vault_token,
        "VAULT_SECRET_ID": secret_id,
        "MYSQL_PWD": scratch_password,
    }
    request = rf.get("/api/runs/1", **environment)

    def failing_view(url=database_url):
        connection_string = f"host=db.internal password={database_password} dbname=cp"
        raise RuntimeError("boom: " + connection_string.split()[0])

    try:
        failing_view()
    except RuntimeError:
        page = technical_500_response(request, *sys.exc_info()).content.decode()

    assert "boom: host=db.internal" in page  # the page was rendered, with its frames
    assert "DATABASE_URL" in page and "db.internal" in page
    for secret in (database_password, redis_password, vault_token, secret_id, scratch_password):
        for form in (secret, quote(secret, safe=""), secret.split("@")[-1]):
            assert form not in page, form
