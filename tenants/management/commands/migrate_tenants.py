"""``manage.py migrate_tenants``: migrate tenant databases from a shell, a CI pipeline or cron.

Whoever can run this command has shell access to the control plane and its settings, so it acts
as an operator. ``--as-user NAME`` records (and checks) a control-plane user instead: the user
needs the ``tenants.run_migrations`` permission.
"""

import json
import sys
import time

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from tenants import actions
from tenants.models import FINISHED_RUN_STATUSES, MigrationRun, Provider, Strategy, Trigger
from tenants.selection import missing_tenants, select_targets

EXIT_FAILED = 1
EXIT_USAGE = 2
OK_STATUSES = ("succeeded", "skipped")


class Command(BaseCommand):
    help = (
        "Migrate tenant databases to a revision (default: head). Choose targets with --all, "
        "--shared, --tenant, --strategy, --failed; narrow them with --provider and --region. "
        "Without --sync or --wait the runs are queued for the django-q2 workers and the command "
        "returns at once. Exit code: 0 when every target succeeded, 1 when any failed, 2 for bad "
        "usage."
    )

    def add_arguments(self, parser):
        scope = parser.add_argument_group("which targets")
        scope.add_argument("--all", action="store_true", help="every target")
        scope.add_argument("--shared", action="store_true", help="the shared database(s)")
        scope.add_argument(
            "--tenant", nargs="+", default=[], metavar="ID", help="the databases of these tenants"
        )
        scope.add_argument(
            "--target", nargs="+", default=[], metavar="NAME", help="these targets, by name"
        )
        scope.add_argument(
            "--strategy",
            nargs="+",
            default=[],
            choices=Strategy.values,
            help="every target of these kinds",
        )
        scope.add_argument(
            "--failed",
            action="store_true",
            help="only what failed or was interrupted last time",
        )
        scope.add_argument(
            "--provider",
            nargs="+",
            default=[],
            choices=Provider.values,
            help="only these providers",
        )
        scope.add_argument("--region", nargs="+", default=[], help="only these regions")

        how = parser.add_argument_group("how")
        how.add_argument("--to", default="head", metavar="REVISION", help="revision (default head)")
        mode = how.add_mutually_exclusive_group()
        mode.add_argument(
            "--dry-run",
            action="store_true",
            help="print the SQL each target would run; change nothing",
        )
        mode.add_argument(
            "--sync",
            action="store_true",
            help="run the migrations in this process, one after the other, without the queue",
        )
        mode.add_argument(
            "--wait",
            action="store_true",
            help="queue the runs, then show progress until all finish",
        )
        how.add_argument(
            "--timeout",
            type=int,
            default=0,
            metavar="SECONDS",
            help="with --wait: give up waiting after this long (default: wait as long as it takes)",
        )
        how.add_argument("--json", action="store_true", help="machine-readable results on stdout")
        how.add_argument(
            "--recover",
            action="store_true",
            help="first close runs whose worker died (no heartbeat for RUN_STALE_AFTER_SECONDS), "
            "reading each target's real revision back; alone, do only that",
        )
        how.add_argument(
            "--as-user",
            metavar="USERNAME",
            help="record this control-plane user as the one who triggered the runs (checked for "
            "the tenants.run_migrations permission)",
        )

    def handle(self, *args, **options):
        user = self._acting_user(options["as_user"])
        scopes = ("all", "shared", "tenant", "target", "strategy", "failed", "provider", "region")
        if options["recover"]:
            from migrator.tasks import recover_stale_runs

            lines = recover_stale_runs()
            for line in lines:
                self.stderr.write(line)
            self.stderr.write(f"Recovered {len(lines)} abandoned run(s).")
            if not any(options[k] for k in scopes):
                return
        unknown = missing_tenants(options["tenant"])
        if unknown:
            raise CommandError(
                f"Unknown tenant id(s): {', '.join(unknown)}.", returncode=EXIT_USAGE
            )
        targets = list(
            select_targets(
                all_targets=options["all"],
                shared=options["shared"],
                tenant_ids=options["tenant"],
                target_names=options["target"],
                strategies=options["strategy"],
                providers=options["provider"],
                regions=options["region"],
                failed=options["failed"],
            )
        )
        if not targets:
            if not any(
                options[k]
                for k in (
                    "all",
                    "shared",
                    "tenant",
                    "target",
                    "strategy",
                    "failed",
                    "provider",
                    "region",
                )
            ):
                raise CommandError(
                    "Say which targets: --all, --shared, --tenant ID, --target NAME, --strategy, "
                    "--failed, --provider or --region.",
                    returncode=EXIT_USAGE,
                )
            self._emit([], options)
            self.stderr.write("No target matches.")
            return

        if options["dry_run"]:
            return self._dry_run(targets, options)

        dispatches = actions.do_enqueue_runs(
            targets,
            trigger=Trigger.COMMAND,
            acting_user=user,
            revision=options["to"],
            enqueue=not options["sync"],
        )
        if options["sync"]:
            self._run_inline(dispatches, options)
        elif options["wait"]:
            self._wait(dispatches, options)
        runs = self._reload(dispatches)
        self._emit(runs, options, dispatches=dispatches)
        if options["sync"] or options["wait"]:
            failed = [r for r in runs if r.status not in OK_STATUSES]
            if failed:
                sys.exit(EXIT_FAILED)

    # --- modes ----------------------------------------------------------------------------

    def _run_inline(self, dispatches, options):
        from migrator.tasks import run_migration

        created = [d.run for d in dispatches if d.created]
        for index, run in enumerate(created, 1):
            run_migration(run.pk)
            run.refresh_from_db(fields=["status"])
            if not options["json"]:
                self.stderr.write(f"[{index}/{len(created)}] {run.target.name}: {run.status}")

    def _wait(self, dispatches, options):
        run_ids = [d.run.pk for d in dispatches if d.run is not None]
        total = len(run_ids)
        progress = Progress(self.stderr, total, enabled=not options["json"])
        deadline = time.monotonic() + options["timeout"] if options["timeout"] else None
        while True:
            counts = dict.fromkeys(FINISHED_RUN_STATUSES, 0)
            for status in MigrationRun.objects.filter(
                pk__in=run_ids, status__in=FINISHED_RUN_STATUSES
            ).values_list("status", flat=True):
                counts[status] += 1
            progress.update(counts)
            if sum(counts.values()) >= total:
                progress.finish()
                return
            if deadline and time.monotonic() > deadline:
                progress.finish()
                self.stderr.write(
                    f"Gave up waiting after {options['timeout']}s; the runs go on in the workers."
                )
                return
            time.sleep(0.25)

    def _dry_run(self, targets, options):
        from migrator import runner
        from migrator.exceptions import MigratorError
        from migrator.secrets import get_secrets_manager
        from migrator.targets import Target

        secrets = get_secrets_manager()
        results = []
        for record in targets:
            entry = {"target": record.name, "provider": record.provider}
            try:
                connection = secrets.migration_credentials(
                    record.vault_path, provider=record.provider
                )
                target = Target(record.name, connection)
                state = runner.current(target)
                preview = runner.sql_preview(target, state.revision, options["to"])
                entry.update(revision_before=state.revision, sql=preview.sql, status="preview")
            except MigratorError as exc:
                entry.update(status="failed", error=str(exc))
            results.append(entry)
            if not options["json"]:
                self.stdout.write(f"-- {record.name} ({record.provider}) --")
                self.stdout.write(entry.get("sql") or f"-- error: {entry['error']}")
        if options["json"]:
            self.stdout.write(json.dumps(results, indent=2))
        if any(r["status"] == "failed" for r in results):
            sys.exit(EXIT_FAILED)

    # --- helpers --------------------------------------------------------------------------

    def _acting_user(self, username):
        if not username:
            return None
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"No control-plane user named {username!r}.", returncode=EXIT_USAGE)
        if not user.has_perm("tenants.run_migrations"):
            raise CommandError(
                f"User {username!r} lacks the 'tenants.run_migrations' permission "
                "(Can run tenant migrations).",
                returncode=EXIT_USAGE,
            )
        return user

    def _reload(self, dispatches):
        ids = [d.run.pk for d in dispatches if d.run is not None]
        by_id = MigrationRun.objects.select_related("target").in_bulk(ids)
        return [by_id[i] for i in ids]

    def _emit(self, runs, options, dispatches=()):
        skipped = [d for d in dispatches if d.run is None]
        if options["json"]:
            payload = [run_as_dict(run) for run in runs] + [
                {"target": d.target.name, "status": "not-queued", "error": d.reason}
                for d in skipped
            ]
            self.stdout.write(json.dumps(payload, indent=2))
            return
        for d in skipped:
            self.stderr.write(d.message)
        if runs:
            self.stdout.write(summary_table(runs))


def run_as_dict(run):
    return {
        "run": run.pk,
        "target": run.target.name,
        "provider": run.target.provider,
        "region": run.target.region,
        "status": run.status,
        "requested_revision": run.requested_revision,
        "revision_before": run.revision_before or None,
        "revision_after": run.revision_after or None,
        "applied": run.applied,
        "duration_ms": run.duration_ms,
        "error": run.error or None,
        "error_code": run.error_code or None,
        "retryable": run.retryable,
    }


def summary_table(runs):
    """A plain-text table, one row per run, and a count line under it."""
    header = ("TARGET", "PROVIDER", "STATUS", "REVISION", "APPLIED", "MS", "ERROR")
    rows = [
        (
            run.target.name,
            run.target.provider,
            run.status,
            f"{run.revision_before or 'base'} -> {run.revision_after or '?'}"
            if run.finished_at
            else run.requested_revision,
            str(len(run.applied)),
            "" if run.duration_ms is None else str(run.duration_ms),
            (run.error.splitlines()[0][:100] if run.error else ""),
        )
        for run in runs
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    counts = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return "\n".join(lines)


class Progress:
    """A progress bar on a terminal; a line per change elsewhere (logs of a CI job)."""

    WIDTH = 30

    def __init__(self, stream, total, enabled=True):
        self.stream = stream
        self.total = total
        self.enabled = enabled
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.last = None

    def update(self, counts):
        done = sum(counts.values())
        if not self.enabled or done == self.last:
            return
        self.last = done
        filled = int(self.WIDTH * done / self.total) if self.total else self.WIDTH
        bar = "#" * filled + "." * (self.WIDTH - filled)
        failed = counts.get("failed", 0) + counts.get("interrupted", 0)
        line = f"[{bar}] {done}/{self.total} done, {failed} failed"
        if self.tty:
            self.stream.write("\r" + line, ending="")
            self.stream.flush()
        else:
            self.stream.write(line)

    def finish(self):
        if self.enabled and self.tty:
            self.stream.write("")
