"""Files and tokens at rest: the control plane's files are private, API tokens are stored hashed."""

import io
import os
import re
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client

from tests.test_settings_checks import run_manage


@pytest.fixture
def operator(django_user_model):
    user = django_user_model.objects.create_user("operator")
    user.user_permissions.add(Permission.objects.get(codename="run_migrations"))
    return user


def create_api_token(*args):
    out, err = io.StringIO(), io.StringIO()
    call_command("create_api_token", *args, stdout=out, stderr=err)
    return out.getvalue().strip(), err.getvalue()


def control_plane_files():
    """The bytes of the control plane's SQLite database and its write-ahead log."""
    name = connection.settings_dict["NAME"]
    return b"".join(
        Path(path).read_bytes() for path in (name, f"{name}-wal") if os.path.exists(path)
    )


@pytest.mark.django_db(transaction=True)  # committed, so the rows are in the file
def test_create_api_token_prints_a_working_token_that_is_stored_only_as_a_digest(
    operator, tenant_factory
):
    token, note = create_api_token("operator")
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert "shown only now" in note and "Bearer" in note

    api = Client(headers={"Authorization": f"Bearer {token}"})
    tenant = tenant_factory(auto_migrate=False)
    assert api.post(f"/api/tenants/{tenant.id}/migrate").status_code == 202

    from knox.models import AuthToken

    stored = AuthToken.objects.get(user=operator)
    assert token not in stored.digest and stored.digest.encode() in control_plane_files()
    assert token.encode() not in control_plane_files()
    assert stored.expiry is not None  # API_TOKEN_TTL_DAYS


@pytest.mark.django_db
def test_create_api_token_refuses_an_unknown_user_and_warns_about_the_permission(
    django_user_model,
):
    with pytest.raises(CommandError, match="No user 'ghost'"):
        create_api_token("ghost")
    django_user_model.objects.create_user("reader")
    token, note = create_api_token("reader", "--days", "0")
    assert token and "neither the 'Can run tenant migrations' nor the 'Can register" in note
    assert "expires: never" in note

    from django.contrib.auth.models import Permission

    registrar = django_user_model.objects.create_user("registrar")
    registrar.user_permissions.add(Permission.objects.get(codename="register_tenants"))
    token, note = create_api_token("registrar")
    assert token and "neither" not in note


@pytest.mark.django_db
def test_expired_token_is_refused(operator, tenant_factory):
    from knox.models import AuthToken

    _, token = AuthToken.objects.create(user=operator, expiry=timedelta(seconds=-1))
    api = Client(headers={"Authorization": f"Bearer {token}"})
    tenant = tenant_factory(auto_migrate=False)
    assert api.post(f"/api/tenants/{tenant.id}/migrate").status_code == 401


@pytest.mark.django_db
def test_admin_shows_a_new_token_once_and_it_works(admin_client, operator, tenant_factory):
    response = admin_client.post(
        "/admin/knox/authtoken/add/", {"user": operator.pk, "expiry": ""}, follow=True
    )
    assert response.status_code == 200
    [token] = re.findall(r"TOKEN ([0-9a-f]{64})", response.content.decode())
    api = Client(headers={"Authorization": f"Bearer {token}"})
    tenant = tenant_factory(auto_migrate=False)
    assert api.post(f"/api/tenants/{tenant.id}/migrate").status_code == 202
    listing = admin_client.get("/admin/knox/authtoken/").content.decode()
    assert token not in listing


@pytest.mark.django_db(transaction=True)
def test_plain_tokens_from_before_are_hashed_and_keep_working(operator, tenant_factory):
    """A control plane upgraded from DRF's authtoken (plain-text keys in authtoken_token)."""
    old_key = "0123456789abcdef0123456789abcdef01234567"
    call_command("migrate", "controlplane", "zero", verbosity=0)
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE authtoken_token (key varchar(40) PRIMARY KEY, created datetime "
            "NOT NULL, user_id integer NOT NULL UNIQUE)"
        )
        cursor.execute(
            "INSERT INTO authtoken_token VALUES (%s, CURRENT_TIMESTAMP, %s)", [old_key, operator.pk]
        )
    try:
        call_command("migrate", "controlplane", verbosity=0)
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM authtoken_token")
            assert cursor.fetchone() == (0,)
        api = Client(headers={"Authorization": f"Token {old_key}"})
        tenant = tenant_factory(auto_migrate=False)
        assert api.post(f"/api/tenants/{tenant.id}/migrate").status_code == 202
        assert old_key.encode() not in control_plane_files()
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE IF EXISTS authtoken_token")


def test_data_dir_and_the_database_are_created_private(tmp_path):
    data_dir = tmp_path / "data"
    result = run_manage("migrate", "-v0", DEBUG="true", DATA_DIR=str(data_dir))
    assert result.returncode == 0, result.stderr
    database = data_dir / "controlplane.sqlite3"
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
    assert database.stat().st_size > 0


def test_a_world_readable_database_from_before_is_made_private(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o755)
    database = data_dir / "controlplane.sqlite3"
    assert run_manage("migrate", "-v0", DEBUG="true", DATA_DIR=str(data_dir)).returncode == 0
    database.chmod(0o644)
    result = run_manage("check", DEBUG="true", DATA_DIR=str(data_dir))
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
