"""Fixtures for tests that dispatch real migrations: tenants whose secrets are in OpenBao."""

import pytest

HEAD = "0006_contract_drop_display_name"


@pytest.fixture
def registered_tenant(vault, vault_secret, tenant_factory, pg_database, mysql_database):
    """Factory: a dedicated tenant on a real database, its secret in OpenBao.

    ``registered_tenant("postgresql")``, ``registered_tenant("mysql")``, or
    ``registered_tenant("missing-secret")`` for a PostgreSQL tenant whose secret was never stored.
    """

    def make(kind="postgresql", tenant_id=None, **fields):
        fields.setdefault("auto_migrate", False)
        provider = "postgresql" if kind == "missing-secret" else kind
        tenant = tenant_factory(
            provider=provider, **({"id": tenant_id} if tenant_id else {}), **fields
        )
        if kind != "missing-secret":
            db = pg_database() if provider == "postgresql" else mysql_database()
            vault_secret(tenant.target.vault_path, db.secret())
            tenant.database = db
        return tenant

    return make
