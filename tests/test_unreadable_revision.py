"""A team's revision imports a module of its own application (spiff-arena's revisions import
``spiffworkflow_backend.models.db.dialect_name``) that the control plane's processes cannot
import: every entry point says which file, what failed and what to do; none answers with a
traceback or an HTTP 500."""

import io
import shutil
from pathlib import Path

import pytest
from django.core import checks
from django.core.management import call_command
from django.urls import reverse

from tenants.models import MigrationRun

pytestmark = [pytest.mark.vault, pytest.mark.postgres]

FIXTURES = Path(__file__).resolve().parent / "alembic_fixtures"

REVISION = '''"""Uses a helper of the team's own application."""

from alembic import op

from teamapp.models.db import dialect_name

revision = "o004_teamapp"
down_revision = "o003_gizmos"
branch_labels = None
depends_on = None


def upgrade():
    if dialect_name() == "postgresql":
        op.execute("CREATE TABLE teamapp (id integer)")


def downgrade():
    op.execute("DROP TABLE teamapp")
'''


def migrate_tenants(*args):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("migrate_tenants", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue() + err.getvalue()


@pytest.mark.django_db
def test_a_revision_importing_a_module_the_control_plane_cannot_import_is_named(
    registered_tenant, settings, tmp_path, admin_client
):
    location = tmp_path / "team"
    shutil.copytree(FIXTURES / "own_cookbook", location, ignore=shutil.ignore_patterns("__py*"))
    (location / "versions" / "o004_teamapp.py").write_text(REVISION)
    settings.TENANT_MIGRATIONS_DIR = str(location)
    tenant = registered_tenant("postgresql")
    expected = [
        "o004_teamapp.py",
        "ModuleNotFoundError: No module named 'teamapp'",
        "PYTHONPATH",
    ]

    # `manage.py check`: a warning (the web process still starts; every run would fail).
    [warning] = [m for m in checks.run_checks() if m.id == "controlplane.W012"]
    for text in expected:
        assert text in warning.msg, warning.msg

    # The preview: that target's row says it, no traceback; exit 1 (nothing could be planned).
    code, said = migrate_tenants("--tenant", tenant.id, "--dry-run")
    assert code == 1, said
    assert "Traceback" not in said
    for text in ("o004_teamapp.py", "No module named 'teamapp'"):
        assert text in said, said

    # A run: refused or failed with the same words, never an internal error.
    code, said = migrate_tenants("--tenant", tenant.id, "--sync")
    assert code == 1, said
    assert "Traceback" not in said
    assert "No module named 'teamapp'" in said, said
    assert ".." not in said
    run = MigrationRun.objects.filter(target=tenant.target).first()
    if run is not None:
        assert run.error_code == "script_directory_unreadable", run.error
        for text in expected:
            assert text in run.error, run.error

    # The admin's pages that show heads and phases answer.
    for name in ("tenants_migrationtarget_changelist", "tenants_tenant_changelist"):
        assert admin_client.get(reverse(f"admin:{name}")).status_code == 200, name
    response = admin_client.get(reverse("fleet-dashboard"))
    assert response.status_code == 200
    assert "No module named" in response.content.decode()


@pytest.mark.django_db
def test_a_failed_runs_error_is_printed_whole_under_the_table(registered_tenant):
    """The table's ERROR column is cut; the line under it gives the command to run whole."""
    tenant = registered_tenant("missing-secret")
    code, said = migrate_tenants("--tenant", tenant.id, "--sync")
    assert code == 1, said
    assert f"Create it with: vault kv put secret/database/{tenant.target.vault_path} " in said
    assert "admin_password=..." in said


@pytest.fixture
def unreadable_tenant(registered_tenant, settings, tmp_path):
    """A tenant recorded at o003_gizmos, whose script directory gained o004_teamapp.py, which
    imports a module the control plane cannot import."""
    location = tmp_path / "team"
    shutil.copytree(FIXTURES / "own_cookbook", location, ignore=shutil.ignore_patterns("__py*"))
    (location / "versions" / "o004_teamapp.py").write_text(REVISION)
    settings.TENANT_MIGRATIONS_DIR = str(location)
    tenant = registered_tenant("postgresql")
    tenant.target.revision = "o003_gizmos"
    tenant.target.save(update_fields=["revision"])
    return tenant


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["downgrade_to_revision", "run_expand_phase"])
def test_the_admins_downgrade_and_phase_actions_name_the_unreadable_file(
    unreadable_tenant, admin_client, action
):
    url = reverse("admin:tenants_migrationtarget_changelist")
    form = {"action": action, "_selected_action": [unreadable_tenant.target_id]}
    response = admin_client.post(url, form)
    assert response.status_code == 302, response.status_code  # back to the list, not a 500
    page = admin_client.get(response.url).content.decode()
    assert "o004_teamapp.py" in page
    assert "No module named &#x27;teamapp&#x27;" in page
    assert "PYTHONPATH" in page
    assert not MigrationRun.objects.exists()


@pytest.mark.django_db
@pytest.mark.parametrize(
    "request_args",
    [("--phase", "expand", "--wait"), ("--to", "o002_gadgets", "--yes")],
    ids=["phase", "to"],
)
def test_migrate_tenants_phase_and_to_name_the_unreadable_file(unreadable_tenant, request_args):
    code, said = migrate_tenants("--tenant", unreadable_tenant.id, *request_args)
    assert code == 1, said  # refused, as a plain upgrade is
    assert "Traceback" not in said
    for text in ("o004_teamapp.py", "No module named 'teamapp'", "PYTHONPATH"):
        assert text in said, said
    assert not MigrationRun.objects.exists()
