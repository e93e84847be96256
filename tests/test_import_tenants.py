"""``import_tenants`` and ``export_tenants`` with real files: an upsert reporting created, updated,
unchanged and invalid rows with their line numbers, ``--dry-run``, ``--migrate``, exit codes, a
status column that retires a tenant, and a round trip through ``export_tenants``."""

import json
from io import StringIO

import pytest
from django.core.management import call_command

GOOD_CSV = """\
tenant_id,name,database_strategy,database_provider,region,vault_path,database_created
acme,Acme Corp,dedicated,postgresql,eu,,true
globex,Globex,Shared,PostgreSQL,eu,,true
initech,"Initech, Inc.",external,mysql,us,customers/initech,false
"""

BAD_CSV = """\
tenant_id,name,database_strategy,database_provider,region,vault_path,database_created
acme,Acme Corp,dedicated,postgresql,eu,,true
Bad Id,Bad,dedicated,postgresql,eu,,true
umbrella,Umbrella,pooled,postgresql,eu,,true
hooli,Hooli,dedicated,oracle,eu,,true
acme,Acme again,dedicated,postgresql,eu,,true
stark,Stark,dedicated,postgresql,eu,,true,extra
wayne,Wayne,dedicated,postgresql,eu,,true
"""


def run(*args):
    """``(exit code, stdout, stderr)`` of ``manage.py import_tenants ARGS``."""
    out, err = StringIO(), StringIO()
    try:
        call_command("import_tenants", *args, stdout=out, stderr=err)
        code = 0
    except SystemExit as exc:
        code = exc.code
    except Exception as exc:  # CommandError: its returncode, as manage.py exits with
        err.write(str(exc))
        code = getattr(exc, "returncode", 1)
    return code, out.getvalue(), err.getvalue()


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


@pytest.mark.django_db
def test_import_creates_then_reports_unchanged_and_updated(tmp_path):
    from tenants.models import MigrationRun, MigrationTarget, Tenant

    path = write(tmp_path, "tenants.csv", GOOD_CSV)
    code, out, err = run(path)
    assert code == 0, err
    assert "3 row(s): 3 created, 0 updated, 0 unchanged, 0 invalid." in out
    assert Tenant.objects.get(pk="initech").name == "Initech, Inc."
    assert MigrationTarget.objects.get(name="initech").vault_path == "customers/initech"
    assert Tenant.objects.get(pk="globex").target.name == "shared-eu"
    assert not MigrationRun.objects.exists()  # no --migrate

    code, out, err = run(path)
    assert code == 0, err
    assert "3 row(s): 0 created, 0 updated, 3 unchanged, 0 invalid." in out

    changed = (
        GOOD_CSV.replace("Acme Corp", "Acme Inc")
        .replace(
            "external,mysql,us,customers/initech,false",
            "external,mysql,us,customers/initech,false,decommissioned",
        )
        .replace("database_created\n", "database_created,status\n", 1)
    )
    code, out, err = run(write(tmp_path, "changed.csv", changed))
    assert code == 0, err
    assert "line 2: acme: updated (name: registered 'Acme Corp', now 'Acme Inc')" in out
    assert "3 row(s): 0 created, 2 updated, 1 unchanged, 0 invalid." in out
    assert Tenant.objects.get(pk="acme").name == "Acme Inc"
    assert Tenant.objects.get(pk="initech").decommissioned
    assert MigrationTarget.objects.get(name="initech").decommissioned

    # Active again: the tenant and its own database are back.
    back = changed.replace("false,decommissioned", "false,active")
    code, out, err = run(write(tmp_path, "back.csv", back))
    assert code == 0, err
    assert "line 4: initech: updated (status: registered 'decommissioned', now 'active')" in out
    assert not Tenant.objects.get(pk="initech").decommissioned
    assert not MigrationTarget.objects.get(name="initech").decommissioned


@pytest.mark.django_db
def test_a_file_with_bad_rows_imports_the_good_ones_and_names_each_bad_line(tmp_path):
    from tenants.models import Tenant

    code, out, err = run(write(tmp_path, "bad.csv", BAD_CSV))
    assert code == 1
    assert "8 row(s)" not in out
    assert "7 row(s): 2 created, 0 updated, 0 unchanged, 5 invalid (line 3, 4, 5, 6, 7)." in out
    assert "line 3: Bad Id: invalid: tenant_id: Use 1 to 63 lower-case letters" in err
    assert (
        'line 4: umbrella: invalid: database_strategy: "pooled" is not a database strategy: ' in err
    )
    assert "use one of shared, dedicated, external." in err
    assert 'line 5: hooli: invalid: database_provider: "oracle" is not a database provider' in err
    assert "line 6: acme: invalid: tenant_id: acme is already in this file (line 2)." in err
    assert "line 7: stark: invalid: non_field_errors: More values than columns" in err
    assert sorted(Tenant.objects.values_list("id", flat=True)) == ["acme", "wayne"]


@pytest.mark.django_db
def test_dry_run_writes_nothing(tmp_path):
    from tenants.models import MigrationTarget, Tenant

    code, out, err = run(write(tmp_path, "tenants.csv", GOOD_CSV), "--dry-run", "--migrate")
    assert code == 0, err
    assert "3 would be created" in out
    assert "Dry run: nothing was written." in out
    assert not Tenant.objects.exists()
    assert not MigrationTarget.objects.exists()


@pytest.mark.django_db
def test_migrate_queues_the_first_migration_of_the_new_tenants(tmp_path):
    from tenants.models import MigrationRun

    code, out, err = run(write(tmp_path, "tenants.csv", GOOD_CSV), "--migrate")
    assert code == 0, err
    # acme's own database and eu's shared one; initech's database is not created yet.
    assert "2 first migration(s) queued." in out
    assert sorted(MigrationRun.objects.values_list("target__name", "trigger")) == [
        ("acme", "command"),
        ("shared-eu", "command"),
    ]
    code, out, err = run(write(tmp_path, "tenants.csv", GOOD_CSV), "--migrate")
    assert "0 first migration(s) queued." in out
    assert MigrationRun.objects.count() == 2


@pytest.mark.django_db
def test_unreadable_files_exit_2_saying_why(tmp_path):
    code, _, err = run(str(tmp_path / "missing.csv"))
    assert code == 2
    assert "Cannot read" in err and "No such file" in err
    code, _, err = run(write(tmp_path, "wrong.csv", "id,title\nacme,Acme\n"))
    assert code == 2
    assert "the first line must name the columns" in err
    code, _, err = run(write(tmp_path, "broken.json", '{"tenant_id": "a"}\n{oops\n'))
    assert code == 2
    assert "line 2: not JSON" in err


@pytest.mark.django_db
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_export_round_trips_through_import(tmp_path, fmt):
    from tenants.models import Tenant

    assert run(write(tmp_path, "tenants.csv", GOOD_CSV))[0] == 0
    exported = tmp_path / f"export.{fmt}"
    call_command("export_tenants", "--format", fmt, "-o", str(exported), stderr=StringIO())
    if fmt == "json":
        events = json.loads(exported.read_text())
        assert events[0] == {
            "tenant_id": "acme",
            "name": "Acme Corp",
            "database_strategy": "dedicated",
            "database_provider": "postgresql",
            "region": "eu",
            "vault_path": "acme",
            "database_created": False,
            "status": "active",
            "canary": False,
        }
    code, out, err = run(str(exported))
    assert code == 0, err
    assert "3 row(s): 0 created, 0 updated, 3 unchanged, 0 invalid." in out

    # Into an empty control plane: the same tenants again.
    Tenant.objects.all().delete()
    code, out, err = run(str(exported))
    assert code == 0, err
    assert "3 created" in out
    stdout = StringIO()
    call_command("export_tenants", "--format", fmt, stdout=stdout)
    assert stdout.getvalue() == exported.read_text()


@pytest.mark.django_db
def test_json_rows_are_numbered_by_the_line_they_start_on(tmp_path):
    events = [
        {
            "tenant_id": "a",
            "name": "A",
            "database_strategy": "dedicated",
            "database_provider": "mysql",
        },
        {
            "tenant_id": "b",
            "name": "B",
            "database_strategy": "dedicated",
            "database_provider": "db2",
        },
    ]
    text = "[\n" + ",\n".join(json.dumps(e, indent=2) for e in events) + "\n]\n"
    code, out, err = run(write(tmp_path, "t.json", text))
    assert code == 1
    line = text.splitlines().index('  "tenant_id": "b",')  # the line after the object's "{"
    assert f"line {line}: b: invalid: database_provider" in err
