"""WSGI entry point. Refuses to start when a setting is wrong (see controlplane.checks)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

application = get_wsgi_application()

from controlplane.checks import raise_on_misconfiguration  # noqa: E402

raise_on_misconfiguration()
