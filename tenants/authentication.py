"""API tokens: ``Authorization: Bearer TOKEN`` against the digests django-rest-knox stores."""

import re

from knox.auth import TokenAuthentication
from rest_framework import exceptions
from rest_framework.authentication import get_authorization_header

# What a token is made of (knox writes hex); anything else is refused before a query is made, so a
# NUL byte or bytes that are not UTF-8 never reach the database.
TOKEN_FORM = re.compile(rb"[0-9A-Za-z_-]{1,256}")


class BearerTokenAuthentication(TokenAuthentication):
    """``Authorization: Bearer TOKEN``, or ``Token TOKEN`` (DRF's keyword), checked against the
    digests django-rest-knox stores; an expired token is refused and deleted."""

    keywords = (b"bearer", b"token")

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() not in self.keywords:
            return None
        if len(parts) != 2 or not TOKEN_FORM.fullmatch(parts[1]):
            raise exceptions.AuthenticationFailed(
                "Invalid Authorization header: expected 'Bearer <token>'."
            )
        return self.authenticate_credentials(parts[1])
