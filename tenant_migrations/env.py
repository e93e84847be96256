"""Alembic environment for tenant databases.

Two ways in:

* The control plane (``migrator.runner``) passes a live SQLAlchemy connection in
  ``config.attributes["connection"]``, already locked and configured for the target
  (Alembic's cookbook recipe "Sharing a Connection across one or more programmatic migration
  commands"). Offline (``--sql``) runs get the dialect in ``config.attributes["dialect_name"]``.
* A migration author runs the plain ``alembic`` CLI against a database of their own:
  ``alembic -x url=postgresql+psycopg://user:pass@localhost/dev upgrade head``
  (or ``sqlalchemy.url`` in alembic.ini). The CLI takes the same target-level lock as the
  control plane (``migrator.locks``), waiting up to ``MIGRATION_LOCK_TIMEOUT`` seconds (60 by
  default, from the environment), so an author never migrates a database a worker is migrating.
"""

import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config

# Only the CLI configures logging from alembic.ini; inside the control plane Django owns logging.
if config.config_file_name is not None and "connection" not in config.attributes:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# Tenant schemas are written as explicit Alembic operations; no autogenerate metadata.
target_metadata = None


def _cli_url():
    return context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )


def _configure_options():
    options = {
        "target_metadata": target_metadata,
        # One transaction per revision: a failing revision leaves the database at the last
        # revision that completed, not at the start of the run.
        "transaction_per_migration": True,
        "compare_type": True,
    }
    # The control plane follows the heads revision by revision (no read-back at the end).
    on_version_apply = config.attributes.get("on_version_apply")
    if on_version_apply is not None:
        options["on_version_apply"] = on_version_apply
    return options


def run_migrations_offline():
    dialect_name = config.attributes.get("dialect_name")
    if dialect_name:
        context.configure(
            dialect_name=dialect_name, literal_binds=True, as_sql=True, **_configure_options()
        )
    else:
        context.configure(url=_cli_url(), literal_binds=True, **_configure_options())
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    connection = config.attributes.get("connection")
    if connection is not None:
        # The runner hands over a connection outside any transaction: Alembic opens one per
        # revision only on a connection that is not already in one.
        context.configure(connection=connection, **_configure_options())
        with context.begin_transaction():
            context.run_migrations()
        return
    url = _cli_url()
    if not url:
        raise SystemExit(
            "No database given: run `alembic -x url=DIALECT+DRIVER://USER:PASS@HOST/DB upgrade "
            "head`, or set sqlalchemy.url in alembic.ini."
        )
    # Imported here: the control plane's own path above needs none of it.
    from migrator import providers
    from migrator.exceptions import TargetLocked
    from migrator.locks import target_lock

    engine = create_engine(url, poolclass=pool.NullPool)
    provider = providers.for_dialect(engine.dialect.name)
    if provider is not None:
        provider.prepare_engine(engine)
    timeout = float(os.environ.get("MIGRATION_LOCK_TIMEOUT", "60"))
    with engine.connect() as conn:
        name = engine.url.render_as_string(hide_password=True)
        try:
            with target_lock(conn, timeout=timeout, target_name=name):
                context.configure(connection=conn, **_configure_options())
                with context.begin_transaction():
                    context.run_migrations()
        except TargetLocked as exc:
            raise SystemExit(str(exc)) from None


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
