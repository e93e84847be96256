"""Factories for the control plane's own records, as fixtures."""

import itertools

import pytest

_counter = itertools.count(1)


@pytest.fixture
def target_factory(db):
    from tenants.models import MigrationTarget

    def make(**fields):
        n = next(_counter)
        fields.setdefault("name", f"target-{n}")
        fields.setdefault("kind", "dedicated")
        fields.setdefault("provider", "postgresql")
        return MigrationTarget.objects.create(**fields)

    return make


@pytest.fixture
def tenant_factory(db, target_factory):
    """Makes a valid tenant: dedicated ones get a target of their own, named after them."""
    from tenants.models import MigrationTarget, Tenant

    def make(**fields):
        n = next(_counter)
        fields.setdefault("id", f"tenant-{n}")
        fields.setdefault("name", f"Tenant {n}")
        fields.setdefault("strategy", "dedicated")
        if "target" not in fields:
            if fields["strategy"] == "shared":
                region = fields.get("region", "default")
                fields["target"] = MigrationTarget.objects.filter(
                    kind="shared", region=region
                ).first() or target_factory(name=f"shared-{region}", kind="shared", region=region)
            else:
                fields["target"] = target_factory(
                    name=fields["id"],
                    kind=fields["strategy"],
                    region=fields.get("region", "default"),
                    provider=fields.pop("provider", "postgresql"),
                )
        tenant = Tenant(**fields)
        tenant.full_clean()
        tenant.save()
        return tenant

    return make
