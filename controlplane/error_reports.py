"""What Django's error pages and error e-mails may show: never a credential.

With ``DEBUG=true`` (``make demo``, Compose's ``web``) the technical 500 page lists every setting,
the request's META (under ``runserver`` that is the whole process environment: ``DATABASE_URL``,
``REDIS_URL``, ``VAULT_TOKEN`` ...) and each frame's local variables. Django's own filter hides
values by name (``TOKEN``, ``SECRET``, ``PASS`` ...) and, without DEBUG only, what views and
functions mark sensitive (the admin login's password). This one does both with DEBUG too, and
takes the password out of any URL or ``password=`` pair it finds in a value, whatever the name,
in settings, META and frame variables.
"""

import re

from django.views.debug import SafeExceptionReporterFilter

# scheme://user:password@host -> the password, up to the last '@' of the URL (an unencoded '@' or
# '/' in a password must not leave its end shown); password=... / pwd=... in a DSN or a query.
URL_PASSWORD = re.compile(
    r"""(?P<head>[A-Za-z][A-Za-z0-9+.-]*://[^/\s:@'"]*:)[^\s'"]*(?P<tail>@)"""
)
PAIR_PASSWORD = re.compile(r"(?P<head>\b(?:password|passwd|pwd)\s*=\s*)[^&;\s]+", re.I)


def redact(text):
    """``text`` with the passwords of URLs and ``password=`` pairs replaced by stars."""
    stars = CredentialFilter.cleansed_substitute
    text = URL_PASSWORD.sub(lambda m: f"{m['head']}{stars}{m['tail']}", text)
    return PAIR_PASSWORD.sub(lambda m: f"{m['head']}{stars}", text)


class Redacted:
    """A frame variable shown by its redacted ``repr``."""

    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


class CredentialFilter(SafeExceptionReporterFilter):
    """Django's filter, active with DEBUG too, hiding more names and every URL's password."""

    hidden_settings = re.compile(
        "API|AUTH|TOKEN|KEY|SECRET|PASS|PWD|SIGNATURE|CREDENTIAL|PRIVATE|HTTP_COOKIE", flags=re.I
    )

    def is_active(self, request):
        return True

    def cleanse_setting(self, key, value):
        cleansed = super().cleanse_setting(key, value)
        if isinstance(cleansed, str):
            return redact(cleansed)
        return cleansed

    def get_traceback_frame_variables(self, request, tb_frame):
        safe = []
        for name, value in super().get_traceback_frame_variables(request, tb_frame):
            if isinstance(name, str) and self.hidden_settings.search(name):
                safe.append((name, self.cleansed_substitute))
                continue
            if isinstance(value, dict | list | tuple):
                # An environment or a settings dict in a frame: hidden by key, like settings.
                value = self.cleanse_setting("", value)
            try:
                shown = repr(value)
            except Exception:  # noqa: BLE001 - Django shows such a value as its error too
                safe.append((name, value))
                continue
            redacted = redact(shown)
            safe.append((name, value if redacted == shown else Redacted(redacted)))
        return safe
