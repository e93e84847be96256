"""What `migrate_tenants` prints: `?` where it could not read a database (never `base`), errors
cut between words, and `-q` printing only what went wrong."""

import io
import re

import pytest
from django.core.management import call_command

pytestmark = [pytest.mark.vault, pytest.mark.postgres, pytest.mark.mysql]


def migrate_tenants(*args):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("migrate_tenants", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue(), err.getvalue()


def row_of(table, name):
    [line] = [line for line in table.splitlines() if line.startswith(name + " ")]
    return line


@pytest.mark.django_db
def test_a_database_that_could_not_be_read_shows_a_question_mark_and_why(registered_tenant):
    from tenants.models import MigrationRun

    lost = registered_tenant("missing-secret")
    good = registered_tenant("postgresql")

    code, out, err = migrate_tenants("--target", lost.target.name, good.target.name, "--dry-run")
    line = row_of(out, lost.target.name)
    assert re.search(r"\s\?\s+record\s", line), line
    assert "No secret" in line
    assert re.search(r"\sbase\s+live\s", row_of(out, good.target.name))

    code, out, err = migrate_tenants("--target", lost.target.name, good.target.name, "--sync")
    assert code == 1
    line = row_of(out, lost.target.name)
    assert "? -> ?" in line, line
    assert "base -> " in row_of(out, good.target.name)
    # The error is cut between two words, and says so.
    error = MigrationRun.objects.get(target=lost.target).error.splitlines()[0]
    shown = line.split("  ")[-1].strip()
    assert shown.endswith(" …"), shown
    kept = shown[: -len(" …")]
    assert error.startswith(kept) and len(kept) < len(error)
    assert error[len(kept)] == " ", (kept, error)


@pytest.mark.django_db
def test_quiet_prints_only_what_went_wrong(registered_tenant):
    lost = registered_tenant("missing-secret")
    good = registered_tenant("postgresql")

    code, out, err = migrate_tenants("-q", "--target", good.target.name, "--sync")
    assert (code, out, err) == (0, "", "")

    code, out, err = migrate_tenants("-q", "--target", lost.target.name, good.target.name, "--sync")
    assert code == 1
    assert out == ""
    assert err.startswith(f"{lost.target.name}: failed: No secret"), err
    assert good.target.name not in err
