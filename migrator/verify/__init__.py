"""Schema verification: is a target's schema the one its revision should give, and may its app
user do what the application needs (and no more)?

After every upgrade that applied something (``migrator.pipeline``), and for the whole fleet on
a schedule (``migrator.tasks.check_fleet_for_drift``, every VERIFY_SCHEDULE_MINUTES) or on
demand (``migrate_tenants --verify``):

1. the target's schema is reflected (``migrator.schema``) through its admin connection;
2. it is compared with the **reference** for its revision and provider: the schema a scratch
   database of the same provider has after an upgrade to that revision. The scratch database is
   created on VERIFY_SCRATCH_POSTGRES_URL or VERIFY_SCRATCH_MYSQL_URL (a temporary file for
   SQLite), migrated, reflected and dropped; the reference is then kept in this process and in
   ``DATA_DIR/schema-references/<provider>/<revision>-<hash>.json`` for every worker sharing
   DATA_DIR. The hash covers the revision files the reference was built from (and ``env.py``),
   so an edited revision gets a new reference. Without a scratch server for the provider the
   schema is "not verified", never failed;
3. the server is asked for the app user's privileges (PostgreSQL, MySQL/MariaDB): SELECT,
   INSERT, UPDATE, DELETE on every table (PostgreSQL: USAGE on the schema and on serial
   sequences too), and no DDL rights (PostgreSQL: CREATE on the database or the schema, owning
   a table, superuser; MySQL: CREATE, ALTER, DROP, INDEX). The fleet check logs in as the app
   user with its own credentials from Vault, which proves them too; after an upgrade on
   PostgreSQL the same questions are asked on the run's admin connection about the app role
   (no second login per run). Only privilege queries: nothing is written.

After a target's first, a PostgreSQL schema already seen by the process costs one catalog query
(``schema.reflect``'s digest); the whole check after an upgrade runs on the run's connection.

The outcome is a ``Verification``, a value: the bridge (``migrator.tasks``) records it on the
target (``schema_fingerprint``, ``drifted``, ``drift_report``, ``verified_at``) and on the run.
Verification never fails a run: the migration itself worked, and whatever goes wrong here is
reported as "not verified" with the reason.

One module per concern:

- ``report``: ``Verification`` and ``GrantCheck``, the values, with the report and log lines;
- ``check``: one target (``verify_target``) and the hook after an upgrade
  (``verify_after_upgrade``, with ``app_credentials``);
- ``references``: the reference schema of a revision, kept in this process and in files under
  DATA_DIR (with a lock file between workers), and the reflected schemas shared the same way;
- ``scratch``: the throw-away databases references are built on;
- ``grants``: the app user's privilege queries.
"""

from migrator.verify.check import app_credentials, verify_after_upgrade, verify_target
from migrator.verify.grants import check_app_grants
from migrator.verify.references import (
    Reference,
    build_reference,
    lineage_hash,
    reference_builds,
    reference_for,
    shared_reflections,
)
from migrator.verify.report import FINGERPRINT_SHOWN, GrantCheck, Verification
from migrator.verify.scratch import scratch_target

__all__ = [
    "FINGERPRINT_SHOWN",
    "GrantCheck",
    "Reference",
    "Verification",
    "app_credentials",
    "build_reference",
    "check_app_grants",
    "lineage_hash",
    "reference_builds",
    "reference_for",
    "scratch_target",
    "shared_reflections",
    "verify_after_upgrade",
    "verify_target",
]
