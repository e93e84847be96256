"""Bounds on guessing: the API's request rates (DRF throttles) and failed admin logins.

Counted in Django's cache, which is per process unless CACHES names a shared one: with N web
processes a caller gets at most N times the bound.
"""

import hashlib
import math

from django.conf import settings
from django.contrib import admin
from django.contrib.auth.signals import user_logged_in, user_login_failed
from django.core.cache import cache
from django.dispatch import receiver
from django.template.response import TemplateResponse
from rest_framework.throttling import AnonRateThrottle, UserRateThrottle


class AnonThrottle(AnonRateThrottle):
    """API requests without a valid token, by client address: ``API_THROTTLE_ANON``."""

    def get_rate(self):
        return settings.API_THROTTLE_ANON or None


class UserThrottle(UserRateThrottle):
    """API requests per user with a valid token: ``API_THROTTLE_USER``."""

    def get_rate(self):
        return settings.API_THROTTLE_USER or None


# --- the admin login --------------------------------------------------------------------------


def _login_key(request, username):
    address = request.META.get("REMOTE_ADDR", "") if request is not None else ""
    who = f"{address}\0{(username or '').casefold()}".encode()
    return "admin-login-failures:" + hashlib.sha256(who).hexdigest()


@receiver(user_login_failed)
def count_failed_login(sender, credentials, request=None, **kwargs):
    """Counts a failed login by address and user name for ADMIN_LOGIN_LOCKOUT_SECONDS."""
    if request is None or not settings.ADMIN_LOGIN_FAILURE_LIMIT:
        return
    key = _login_key(request, credentials.get("username"))
    cache.set(key, cache.get(key, 0) + 1, settings.ADMIN_LOGIN_LOCKOUT_SECONDS)


@receiver(user_logged_in)
def forget_failed_logins(sender, request=None, user=None, **kwargs):
    if request is not None and user is not None:
        cache.delete(_login_key(request, user.get_username()))


def admin_login(request, extra_context=None):
    """The admin's login view, refusing with 429 a user name that failed
    ADMIN_LOGIN_FAILURE_LIMIT times from this address within ADMIN_LOGIN_LOCKOUT_SECONDS, before
    the password is checked."""
    limit = settings.ADMIN_LOGIN_FAILURE_LIMIT
    if request.method == "POST" and limit:
        username = request.POST.get("username", "")
        if cache.get(_login_key(request, username), 0) >= limit:
            minutes = math.ceil(settings.ADMIN_LOGIN_LOCKOUT_SECONDS / 60)
            response = TemplateResponse(
                request,
                "admin/login_throttled.html",
                {
                    **admin.site.each_context(request),
                    "title": "Too many failed logins",
                    "username": username,
                    "minutes": minutes,
                },
                status=429,
            )
            response["Retry-After"] = str(settings.ADMIN_LOGIN_LOCKOUT_SECONDS)
            return response
    return admin.site.login(request, extra_context)
