"""Where a run's admin user came from (static, or a lease issued by Vault, and whether it was
revoked).
"""

from tenants.actions.saves import save_fields


def do_record_admin_credentials(run, use):
    """Record on ``run`` where its admin user came from (a ``migrator.secrets.CredentialsUse``):
    the mode, the user, the lease's safe form and whether it was revoked. Saved at once when the
    user is issued, so a run whose worker dies shows the lease it left, and again after the
    revocation."""
    save_fields(run, take_credentials(run, use))
    return run


def take_credentials(run, use):
    """Set where ``run``'s admin user came from on it (unsaved); return the fields."""
    run.admin_credentials = use.mode
    run.credentials_user = use.username[:128]
    run.credentials_lease = use.lease[:300]
    run.credentials_revoked = use.revoked
    return ["admin_credentials", "credentials_user", "credentials_lease", "credentials_revoked"]
