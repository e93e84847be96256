"""`migrate_tenants --recover` right after the broker lost its messages (Redis restarted without
persistence): the runs still queued are not abandoned yet (RUN_QUEUED_TIMEOUT_SECONDS), and it
says so, with what to do now, instead of a bare "Recovered 0 abandoned run(s)"."""

import io

import pytest
from django.core.management import call_command

from tenants.models import MigrationRun

pytestmark = [pytest.mark.vault, pytest.mark.postgres]


def migrate_tenants(*args):
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        call_command("migrate_tenants", *args, stdout=out, stderr=err)
    except SystemExit as exc:
        code = exc.code
    return code, out.getvalue() + err.getvalue()


@pytest.mark.django_db(transaction=True)
def test_recover_says_which_queued_runs_it_left_and_what_to_do(registered_tenant, settings):
    settings.RUN_QUEUED_TIMEOUT_SECONDS = 300
    tenant = registered_tenant("postgresql")
    code, said = migrate_tenants("--tenant", tenant.id)  # queued; no worker takes it
    assert code == 0, said
    run = MigrationRun.objects.get(target=tenant.target)
    assert run.status == "queued"

    code, said = migrate_tenants("--recover")
    assert code == 0, said
    assert "Recovered 0 abandoned run(s)." in said
    assert "1 run(s) still queued" in said, said
    assert f"#{run.pk}" in said
    assert "RUN_QUEUED_TIMEOUT_SECONDS (300 s)" in said
    assert "migrate_tenants --cancel" in said
    assert MigrationRun.objects.get(pk=run.pk).status == "queued"  # left alone
