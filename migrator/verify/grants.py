"""The app user's grants: privilege queries only, asked as the app user (which proves its
credentials too) or, on PostgreSQL after an upgrade, on the run's admin connection."""

from __future__ import annotations

import dataclasses

from sqlalchemy import exc as sa_exc

from migrator import engines, providers
from migrator.secrets import ConnectionInfo
from migrator.verify.report import GrantCheck


def _grants_asked_as_admin(app, connection) -> bool:
    """Are the app user's grants asked on the admin ``connection`` (PostgreSQL), not by logging
    in? ``check_app_grants`` decides with it, and ``verify_target`` leaves its transaction open
    for it."""
    return (
        isinstance(app, ConnectionInfo)
        and connection is not None
        and providers.get(app.provider).grants_asked_as_admin
    )


def check_app_grants(
    app: ConnectionInfo, *, tables: list[str], namespace: str | None, admin=None
) -> GrantCheck:
    """Ask the server what the app user may do on ``tables`` (in schema ``namespace`` on
    PostgreSQL). Privilege queries only: nothing is written or created.

    By default it logs in as the app user, which also proves its credentials in Vault work. On
    PostgreSQL, given ``admin`` (an open admin connection to the same database), it asks there
    about the app role instead (``has_table_privilege(role, ...)``): the same answers without a
    second login, which is what the check after each upgrade does; the scheduled and on-demand
    verification log in. MySQL only tells a user its own grants, so there it always logs in.
    """
    check = GrantCheck(username=app.username or "?")
    provider = providers.get(app.provider)
    if _grants_asked_as_admin(app, admin):
        try:
            exists = provider.app_grants(
                admin, check, tables, namespace=namespace, database=app.database, role=app.username
            )
            admin.rollback()
        except sa_exc.DBAPIError as exc:
            check.not_checked = f"the privilege queries failed: {engines.error_reason(exc, app)}"
        else:
            if not exists:
                check.not_checked = (
                    f"app user {app.username} does not exist on the server: create it, or fix "
                    f"app_username in the Vault secret at {app.vault_path}"
                )
        return check
    login = app
    if provider.grants_login_database:
        login = dataclasses.replace(app, database=provider.grants_login_database)
    logged_in = False
    try:
        with engines.connect_as(login) as connection:
            logged_in = True
            provider.app_grants(
                connection, check, tables, namespace=namespace, database=app.database
            )
            connection.rollback()
    except sa_exc.DBAPIError as exc:
        if logged_in:
            check.not_checked = f"the privilege queries failed: {engines.error_reason(exc, app)}"
        elif provider.connect_denied(exc.orig):  # refused for want of CONNECT on the database
            check.missing[f"database {app.database}"] = ["CONNECT"]
        else:
            check.not_checked = (
                f"cannot log in as app user {app.username} "
                f"({engines.error_reason(exc, app)}): check app_username and app_password in "
                f"the Vault secret at {app.vault_path}"
            )
    return check
