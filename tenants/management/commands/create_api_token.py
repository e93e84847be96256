"""``manage.py create_api_token USERNAME``: an API token for a control-plane user, shown once."""

from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from knox.models import get_token_model


class Command(BaseCommand):
    help = (
        "Make an API token for USERNAME and print it once: only its digest is stored, so it "
        "cannot be shown again (make another one if it is lost, and delete the old one in the "
        "admin under API tokens). It expires after API_TOKEN_TTL_DAYS unless --days says "
        "otherwise. The API also needs the user to have the 'Can run tenant migrations' "
        "permission (to migrate) or 'Can register tenants' (to register, change and "
        "decommission tenants and targets)."
    )

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument(
            "--days",
            type=int,
            default=settings.API_TOKEN_TTL_DAYS,
            help="Days until the token expires; 0: never (default: API_TOKEN_TTL_DAYS, "
            f"{settings.API_TOKEN_TTL_DAYS}).",
        )

    def handle(self, *args, username, days, **options):
        if days < 0:
            raise CommandError("--days must be 0 (never expires) or more.", returncode=2)
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: username})
        except User.DoesNotExist:
            raise CommandError(
                f"No user {username!r}: create one with `manage.py createsuperuser` or in the "
                "admin.",
                returncode=2,
            ) from None
        if not user.is_active:
            raise CommandError(f"User {username!r} is inactive.", returncode=2)
        auth_token, token = get_token_model().objects.create(
            user=user, expiry=timedelta(days=days) if days else None
        )
        self.stdout.write(token)
        expires = auth_token.expiry.strftime("%Y-%m-%d %H:%M UTC") if auth_token.expiry else "never"
        self.stderr.write(
            f"API token for {username} (expires: {expires}). It is shown only now; "
            "send it as 'Authorization: Bearer <token>'."
        )
        if not (
            user.has_perm("tenants.run_migrations") or user.has_perm("tenants.register_tenants")
        ):
            self.stderr.write(
                f"Note: {username} has neither the 'Can run tenant migrations' nor the 'Can "
                "register tenants' permission; the API answers 403 until one is given."
            )
