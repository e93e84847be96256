"""``manage.py startup_migrations``: the migrations a container runs before it serves.

The original design's startup options, as an explicit step of the container's start command
(``manage.py startup_migrations && gunicorn ...``), never inside ``AppConfig.ready()``:

* ``MIGRATE_SHARED_ON_STARTUP``: migrate the shared database(s) here and now; a failure stops the
  start (exit 1), because the application cannot serve shared-tier tenants without them.
* ``MIGRATE_ON_STARTUP``: queue a run for every other target; the workers migrate them and
  failures are reported (here, on the runs and on ``/readyz``) without stopping the start.
"""

import sys
import time

from django.conf import settings
from django.core.management.base import BaseCommand

from tenants import actions, planning
from tenants.models import (
    ACTIVE_RUN_STATUSES,
    MigrationTarget,
    RunStatus,
    Strategy,
    TargetStatus,
    Trigger,
)


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
            shared = list(
                MigrationTarget.objects.filter(kind=Strategy.SHARED, decommissioned_at=None)
            )
            rows = planning.plan(shared, planning.Intent.upgrade())
            for row in rows:
                if not row.accepted:  # held: skipped on purpose, as every trigger skips it
                    self.stderr.write(f"Not queued for {row.target.name}: {row.reason}.")
            for dispatch in actions.do_enqueue_plan(rows, trigger=Trigger.STARTUP, enqueue=False):
                if dispatch.run is None:
                    self.stderr.write(dispatch.message)
                    continue
                if dispatch.created:
                    run_migration(dispatch.run.pk)
                else:
                    # A run is already queued (a retry of a start that failed) or running: this
                    # start runs it, or waits for it; the database says how it went.
                    self.stderr.write(dispatch.message)
                    self._take_over(dispatch.run)
                dispatch.run.refresh_from_db()
                if dispatch.run.status not in (RunStatus.SUCCEEDED, RunStatus.SKIPPED):
                    self.stderr.write(
                        f"Shared database {dispatch.target.name} failed to migrate: "
                        f"{dispatch.run.error or dispatch.run.status}"
                    )
            # A start that did not bring every shared database to head fails, whatever the runs
            # say: judged by where each database stands now.
            for target in shared:
                problem = self._not_at_head(target)
                if problem:
                    failed.append(target.name)
                    self.stderr.write(f"Shared database {target.name} {problem}")
        if options["all"] or settings.MIGRATE_ON_STARTUP:
            others = list(
                MigrationTarget.objects.exclude(kind=Strategy.SHARED).filter(decommissioned_at=None)
            )
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

    def _take_over(self, run):
        """Run ``run`` here if it is still queued (``do_start_run`` decides against a worker
        taking it at the same moment); else wait until it ends, at most the task timeout."""
        from migrator.tasks import run_migration

        if run.status == RunStatus.QUEUED:
            self.stderr.write(f"Running run #{run.pk} for {run.target.name} here.")
            run_migration(run.pk)
        deadline = time.monotonic() + settings.MIGRATION_TASK_TIMEOUT
        run.refresh_from_db()
        if run.status in ACTIVE_RUN_STATUSES:
            self.stderr.write(f"Waiting for run #{run.pk} ({run.status}) to finish.")
        while run.status in ACTIVE_RUN_STATUSES and time.monotonic() < deadline:
            time.sleep(1)
            run.refresh_from_db()

    def _not_at_head(self, target):
        """Why the database of ``target`` is not at head, read from it now; "" when it is."""
        from migrator import runner
        from migrator.exceptions import MigratorError
        from migrator.tasks import read_revision

        try:
            revision = read_revision(target)
        except MigratorError as exc:
            return f"could not be read back, so it is not known to be at head: {exc}"
        heads = runner.heads()
        if actions.target_status_for(revision, heads) == TargetStatus.UP_TO_DATE:
            self.stdout.write(f"Shared database {target.name} is at {revision}.")
            return ""
        held = " It is held: release it, or migrate it by hand." if target.held else ""
        return f"is at {revision or 'base (empty)'}, not at head ({', '.join(heads)}).{held}"
