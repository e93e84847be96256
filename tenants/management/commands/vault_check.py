"""``manage.py vault_check``: can this control plane read every target's credentials?"""

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from migrator import engines, providers
from migrator.exceptions import (
    DatabaseAuthFailed,
    DatabaseNotFound,
    DatabaseUnreachable,
    MigratorError,
    VaultAuthError,
    VaultUnavailable,
)
from migrator.secrets import get_secrets_manager
from migrator.targets import Target
from tenants.models import MigrationTarget


class Command(BaseCommand):
    help = (
        "Log in to Vault with the configured method (VAULT_AUTH_METHOD), show the token's "
        "policies and TTL, then check for every migration target that its secret under "
        "VAULT_DATABASE_SECRETS_PATH is readable and complete for migrations (admin user; "
        "for dynamic credentials a user is made and revoked at once, for a static role its "
        "password is read; with an owner_role on PostgreSQL, the admin user logs in and runs "
        "SET ROLE). "
        "Secret values are never printed. Exits with status 1 when Vault cannot be used or "
        "any target is not OK."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--target",
            action="append",
            dest="targets",
            metavar="NAME",
            help="Check only this target (by name); repeat to check several.",
        )

    def handle(self, *args, **options):
        manager = get_secrets_manager()
        try:
            token = manager.token_info()
        except (VaultUnavailable, VaultAuthError) as exc:
            raise CommandError(str(exc), returncode=1) from None
        except MigratorError as exc:
            raise CommandError(f"Vault token check failed: {exc}", returncode=1) from None

        ttl = f"{token['ttl']}s" if token["ttl"] else "no expiry"
        # Vault names a token after its auth method ("token", "approle") unless it was given a
        # name of its own (Kubernetes: the service account): say it only when it tells more.
        name = token["display_name"]
        named = f", token {name!r}" if name and name != token["auth_method"] else ""
        self.stdout.write(
            f"Vault {settings.VAULT_ADDR}: logged in (VAULT_AUTH_METHOD={token['auth_method']}"
            f"{named}); policies: {', '.join(token['policies']) or '-'}; "
            f"TTL {ttl}{', renewable' if token['renewable'] else ''}."
        )

        targets = MigrationTarget.objects.order_by("name")
        names = options["targets"]
        if names:
            targets = targets.filter(name__in=names)
            unknown = sorted(set(names) - {target.name for target in targets})
            if unknown:
                raise CommandError(f"No target named {', '.join(unknown)}.", returncode=1)
        else:
            targets = targets.active()  # a decommissioned target's secret may be gone
        if not targets:
            self.stdout.write("No migration targets to check.")
            return

        failed = 0
        for target in targets:
            problem, line = self._check(manager, target)
            if problem:
                failed += 1
                self.stdout.write(self.style.ERROR(f"FAIL  {target.name}: {problem}"))
            else:
                self.stdout.write(self.style.SUCCESS(f"OK    {target.name}: {line}"))
        checked = len(targets)
        if failed:
            raise CommandError(f"{failed} of {checked} targets not OK.", returncode=1)
        self.stdout.write(f"All {checked} targets OK.")

    @staticmethod
    def _check(manager, target):
        """(problem, line) for one target, in its secret's mode: its admin pair read; a static
        role's current password read; a dynamic user made and revoked at once (which proves the
        role, the policy, the engine's connection and its creation and revocation statements).
        """
        try:
            with manager.admin_credentials(
                target.effective_vault_path, provider=target.provider
            ) as admin:
                connection, use = admin.connection, admin.use
                owner = _owner_role_check(target, connection)  # before the user is revoked
        except MigratorError as exc:
            return f"{type(exc).__name__}: {exc}", ""
        line = f"{connection.vault_path} ({connection.provider})"
        if use.mode == "static-role":
            line += f", static role {use.source}: user {use.username}"
        elif use.mode == "dynamic":
            if not use.revoked:
                return f"{line}, dynamic {use.source}: {use.problem}", ""
            line += (
                f", dynamic {use.source}: made user {use.username} and revoked it "
                f"(lease TTL {use.lease_seconds}s)"
            )
        if owner:
            line += f"; {owner}"
        return "", line


def _owner_role_check(target, connection):
    """On PostgreSQL with an ``owner_role``: log in as the admin user (a dynamic one before it
    is revoked) and ``SET ROLE``, as a run does first (``migrator.engines.connect``): a Vault
    role whose creation statements forgot the GRANT fails every run with owner_role_failed,
    and only a login shows it. Raises ``OwnerRoleFailed``; a database the control plane cannot
    reach is said, not failed (this checks Vault)."""
    if not connection.owner_role or not providers.get(connection.provider).owner_role:
        return ""
    try:
        with engines.connect(Target(target.name, connection)):
            pass
    except (DatabaseUnreachable, DatabaseNotFound, DatabaseAuthFailed) as exc:
        return f"SET ROLE {connection.owner_role} not checked: {type(exc).__name__}: {exc}"
    return f"logged in and ran SET ROLE {connection.owner_role}"
