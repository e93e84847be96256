"""``manage.py startup_migrations``: the migrations a container runs before it serves.

The original design's startup options, as an explicit step of the container's start command
(``manage.py startup_migrations && gunicorn ...``), never inside ``AppConfig.ready()``:

* ``MIGRATE_SHARED_ON_STARTUP``: migrate the shared database(s) here and now; a failure stops the
  start (exit 1), because the application cannot serve shared-tier tenants without them.
* ``MIGRATE_ON_STARTUP``: queue a run for every other target; the workers migrate them and
  failures are reported (here, on the runs and on ``/readyz``) without stopping the start.
"""

import sys

from django.conf import settings
from django.core.management.base import BaseCommand

from tenants import actions, planning
from tenants.models import MigrationTarget, RunStatus, Strategy, Trigger


class Command(BaseCommand):
    help = (
        "Run the startup migrations configured by MIGRATE_SHARED_ON_STARTUP (shared databases, "
        "in this process; exit 1 when one fails) and MIGRATE_ON_STARTUP (every other target, "
        "queued for the workers)."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--shared",
            action="store_true",
            help="migrate the shared database(s) whatever the setting",
        )
        parser.add_argument(
            "--all", action="store_true", help="queue every other target whatever the setting"
        )

    def handle(self, *args, **options):
        from migrator.tasks import run_migration

        failed = []
        if options["shared"] or settings.MIGRATE_SHARED_ON_STARTUP:
            shared = list(MigrationTarget.objects.filter(kind=Strategy.SHARED))
            rows = planning.plan(shared, planning.Intent.upgrade())
            for row in rows:
                if not row.accepted:  # held: skipped on purpose, as every trigger skips it
                    self.stderr.write(f"Not queued for {row.target.name}: {row.reason}.")
            for dispatch in actions.do_enqueue_plan(rows, trigger=Trigger.STARTUP, enqueue=False):
                if dispatch.run is None or not dispatch.created:
                    self.stderr.write(dispatch.message)
                    continue
                run_migration(dispatch.run.pk)
                dispatch.run.refresh_from_db()
                if dispatch.run.status in (RunStatus.SUCCEEDED, RunStatus.SKIPPED):
                    self.stdout.write(
                        f"Shared database {dispatch.target.name} is at "
                        f"{dispatch.run.revision_after} ({dispatch.run.status})."
                    )
                else:
                    failed.append(dispatch.target.name)
                    self.stderr.write(
                        f"Shared database {dispatch.target.name} failed to migrate: "
                        f"{dispatch.run.error}"
                    )
        if options["all"] or settings.MIGRATE_ON_STARTUP:
            others = list(MigrationTarget.objects.exclude(kind=Strategy.SHARED))
            rows = planning.plan(others, planning.Intent.upgrade())
            dispatches = actions.do_enqueue_plan(rows, trigger=Trigger.STARTUP)
            queued = sum(d.created for d in dispatches)
            self.stdout.write(f"Queued {queued} run(s) for the workers.")
            for row in rows:
                if not row.accepted:
                    self.stderr.write(f"Not queued for {row.target.name}: {row.reason}.")
            previously_failed = [t.name for t in others if t.status == "failed"]
            if previously_failed:
                self.stderr.write(
                    f"{len(previously_failed)} target(s) failed last time: "
                    + ", ".join(previously_failed[:20])
                )
        if failed:
            self.stderr.write(
                "Startup stopped: the shared database must be migrated before the application "
                "serves. Fix the error above, then start again."
            )
            sys.exit(1)
