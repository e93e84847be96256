"""``manage.py restore_target --run ID``: put a target back as it was before a run.

Restores the backup that run ``ID`` took before it changed its target (see docs/backups.md),
with the admin credentials from Vault, and records the restore as a run of kind "restore". Like
``migrate_tenants``, whoever runs it acts as an operator: it asks for the target's name to be
typed before it replaces any data, unless ``--yes`` is given.
"""

import sys

from django.core.management.base import BaseCommand, CommandError

from tenants import actions
from tenants.models import MigrationRun, RunStatus

EXIT_FAILED = 1
EXIT_USAGE = 2


class Command(BaseCommand):
    help = (
        "Restore the backup taken before run ID into that run's target, replacing everything "
        "written to it since (the revision goes back to what it was). Checks the file's sha256 "
        "first, asks you to type the target's name (or pass --yes), refuses while the target "
        "has a queued or running run, and records the restore as a run of kind 'restore'. Exit "
        "code: 0 restored; 1 the restore failed or was refused (file missing or altered, target "
        "busy); 2 bad usage or not confirmed."
    )
    # Tests hand in their own input; from a shell it is the terminal.
    stealth_options = ("stdin",)

    def add_arguments(self, parser):
        parser.add_argument(
            "--run",
            type=int,
            required=True,
            metavar="ID",
            help="the run whose backup to restore (the admin shows it under Backup)",
        )
        parser.add_argument(
            "--yes",
            action="store_true",
            help="restore without asking (scripts); without it the target's name must be typed",
        )

    def handle(self, *args, **options):
        from migrator import backups, providers
        from migrator.exceptions import RestoreFailed
        from migrator.tasks import restore_run

        self.stdin = options.get("stdin", sys.stdin)
        backup_run = MigrationRun.objects.select_related("target").filter(pk=options["run"]).first()
        if backup_run is None:
            raise CommandError(f"There is no run #{options['run']}.", returncode=EXIT_USAGE)
        target = backup_run.target
        if not backup_run.backup_path:
            raise CommandError(
                f"Run #{backup_run.pk} ({backup_run.get_kind_display().lower()} of "
                f"{target.name}) took no backup: the target's backup policy was off, or nothing "
                "was pending. Choose a run whose Backup shows a file.",
                returncode=EXIT_USAGE,
            )
        if not providers.get(target.provider).backup.on_server:  # SQL Server's is on its host
            try:
                backups.check_backup_file(backup_run.backup_path, backup_run.backup_checksum)
            except RestoreFailed as exc:
                raise CommandError(str(exc), returncode=EXIT_FAILED) from None
        self._confirm(backup_run, yes=options["yes"])

        dispatch = actions.do_start_restore_run(
            target, backup_run=backup_run, worker_host=actions.worker_identity()
        )
        if not dispatch.created:
            busy = dispatch.run
            raise CommandError(
                f"Nothing was restored: {target.name} has run #{busy.pk} {busy.status}. Wait "
                "for it to finish (or cancel it), then restore."
                if busy is not None
                else f"Nothing was restored: {dispatch.reason}.",
                returncode=EXIT_FAILED,
            )
        run = restore_run(dispatch.run, backup_run=backup_run)
        if run.status != RunStatus.SUCCEEDED:
            raise CommandError(
                f"Restore run #{run.pk} of {target.name} failed: {run.error}",
                returncode=EXIT_FAILED,
            )
        self.stdout.write(
            f"Restored {target.name} from the backup of run #{backup_run.pk} "
            f"({backup_run.backup_path}): it stood at {run.revision_before or 'base'}, it now "
            f"stands at {run.revision_after or 'base'}. Recorded as run #{run.pk}."
        )
        for line in run.log.splitlines():
            if line.startswith("Left in place"):
                self.stderr.write(f"Warning: {line}")

    def _confirm(self, backup_run, *, yes):
        if yes:
            return
        target = backup_run.target
        if not (hasattr(self.stdin, "isatty") and self.stdin.isatty()):
            raise CommandError(
                f"Not restoring {target.name} without a confirmation, and there is no terminal "
                "to ask on: pass --yes to restore from a script.",
                returncode=EXIT_USAGE,
            )
        taken = backup_run.started_at or backup_run.created_at
        self.stderr.write(
            f"This replaces the data of {target.name} ({target.get_provider_display()}) with "
            f"the backup taken before run #{backup_run.pk} on {taken:%Y-%m-%d %H:%M:%S} UTC, at "
            f"revision {backup_run.revision_before or 'base'}. Everything written to it since "
            "is lost."
        )
        self.stderr.write(f"Type the target's name ({target.name}) to restore: ", ending="")
        self.stderr.flush()
        answer = self.stdin.readline().strip()
        if answer != target.name:
            raise CommandError(
                "The name did not match; nothing was restored.", returncode=EXIT_USAGE
            )
