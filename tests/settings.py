"""Settings for the test suite: the product's settings, with a test-only SECRET_KEY."""

import os

os.environ.setdefault("SECRET_KEY", "tests-only-not-a-secret")  # noqa: S105

from controlplane.settings import *  # noqa: E402,F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast, tests only

# One test database file per pytest process, so parallel runs never share one; worker processes
# started by a test are given this file's path explicitly.
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":  # noqa: F405
    DATABASES["default"]["TEST"]["NAME"] = str(  # noqa: F405
        DATA_DIR / f"test-controlplane-{os.getpid()}.sqlite3"  # noqa: F405
    )
