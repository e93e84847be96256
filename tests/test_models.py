"""The record rejects bad input with a clear message, and the database enforces one active run."""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from tenants.models import MigrationRun, MigrationTarget, Tenant

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    "bad_id", ["Acme", "acme corp", "acme;drop table tenants", "-acme", "a" * 64, "ac/me", ""]
)
def test_invalid_tenant_id_is_rejected(target_factory, bad_id):
    tenant = Tenant(id=bad_id, name="Acme", strategy="dedicated", target=target_factory())
    with pytest.raises(ValidationError) as excinfo:
        tenant.full_clean()
    assert "id" in excinfo.value.message_dict


def test_invalid_tenant_id_message_says_what_is_allowed(target_factory):
    tenant = Tenant(id="Acme Corp", name="Acme", strategy="dedicated", target=target_factory())
    with pytest.raises(ValidationError) as excinfo:
        tenant.full_clean()
    assert "lower-case letters, digits" in excinfo.value.message_dict["id"][0]


def test_dedicated_tenant_without_target_is_rejected():
    tenant = Tenant(id="acme", name="Acme", strategy="dedicated")
    with pytest.raises(ValidationError) as excinfo:
        tenant.full_clean()
    assert "needs a migration target of its own" in excinfo.value.message_dict["target"][0]


def test_unknown_provider_is_rejected_listing_the_known_ones():
    target = MigrationTarget(name="acme", kind="dedicated", provider="oracle")
    with pytest.raises(ValidationError) as excinfo:
        target.full_clean()
    message = excinfo.value.message_dict["provider"][0]
    assert "Unknown provider oracle" in message
    assert "postgresql, sqlserver, mysql, sqlite" in message


def test_shared_tenant_lands_in_its_regions_shared_database(target_factory):
    target_factory(name="shared", kind="shared", region="default")
    eu = target_factory(name="shared-eu", kind="shared", region="eu")
    tenant = Tenant(id="acme", name="Acme", strategy="shared", region="eu")
    tenant.full_clean()
    assert tenant.target == eu


def test_shared_tenant_without_shared_database_in_region_is_rejected():
    tenant = Tenant(id="acme", name="Acme", strategy="shared", region="ap")
    with pytest.raises(ValidationError) as excinfo:
        tenant.full_clean()
    assert "no shared database in region 'ap'" in excinfo.value.message_dict["target"][0]


def test_dedicated_tenant_cannot_take_another_tenants_database(tenant_factory):
    first = tenant_factory(id="acme")
    other = Tenant(id="globex", name="Globex", strategy="dedicated", target=first.target)
    with pytest.raises(ValidationError) as excinfo:
        other.full_clean()
    assert "already belongs to tenant acme" in excinfo.value.message_dict["target"][0]


def test_dedicated_tenant_cannot_live_in_a_shared_database(target_factory):
    shared = target_factory(name="shared", kind="shared")
    tenant = Tenant(id="acme", name="Acme", strategy="dedicated", target=shared)
    with pytest.raises(ValidationError) as excinfo:
        tenant.full_clean()
    assert "needs a target of kind 'dedicated'" in excinfo.value.message_dict["target"][0]


def test_tenant_and_its_database_must_share_a_region(target_factory):
    target = target_factory(name="acme", region="eu")
    tenant = Tenant(id="acme", name="Acme", strategy="dedicated", region="us", target=target)
    with pytest.raises(ValidationError) as excinfo:
        tenant.full_clean()
    assert "region 'eu'" in excinfo.value.message_dict["region"][0]


def test_default_vault_paths_follow_the_original_layout(target_factory, settings):
    settings.VAULT_MOUNT_POINT = "secret"
    settings.VAULT_DATABASE_SECRETS_PATH = "database"
    assert target_factory(name="shared", kind="shared").full_vault_path == (
        "secret/data/database/shared"
    )
    assert target_factory(name="shared-eu", kind="shared", region="eu").vault_path == "shared-eu"
    assert target_factory(name="abc123").full_vault_path == "secret/data/database/abc123"
    assert target_factory(name="custom", vault_path="teams/x/db").vault_path == "teams/x/db"


def test_only_one_shared_database_per_region(target_factory):
    target_factory(name="shared", kind="shared")
    with pytest.raises(IntegrityError), transaction.atomic():
        target_factory(name="shared-2", kind="shared")


def test_second_queued_run_for_a_target_fails_in_the_database(target_factory):
    target = target_factory()
    MigrationRun.objects.create(target=target, trigger="command")
    with pytest.raises(IntegrityError), transaction.atomic():
        MigrationRun.objects.create(target=target, trigger="api")
    assert MigrationRun.objects.filter(target=target).count() == 1


def test_a_running_run_also_blocks_a_new_one_but_finished_runs_do_not(target_factory):
    target = target_factory()
    run = MigrationRun.objects.create(target=target, trigger="command", status="running")
    with pytest.raises(IntegrityError), transaction.atomic():
        MigrationRun.objects.create(target=target, trigger="api")
    run.status = "succeeded"
    run.save(update_fields=["status"])
    MigrationRun.objects.create(target=target, trigger="api")
    MigrationRun.objects.create(target=target_factory(), trigger="api")
    assert MigrationRun.objects.filter(status="queued").count() == 2
