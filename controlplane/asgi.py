"""ASGI entry point. Refuses to start when a setting is wrong (see controlplane.checks)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

application = get_asgi_application()

from controlplane.checks import raise_on_misconfiguration  # noqa: E402

raise_on_misconfiguration()
