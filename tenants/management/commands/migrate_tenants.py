"""``manage.py migrate_tenants``: migrate tenant databases from a shell, a CI pipeline or cron.

Whoever can run this command has shell access to the control plane and its settings, so it acts
as an operator. ``--as-user NAME`` records (and checks) a control-plane user instead: the user
needs the ``tenants.run_migrations`` permission.
"""

import io
import json
import sys
import textwrap
import time

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, OutputWrapper
from django.core.serializers.json import DjangoJSONEncoder

from migrator.phases import PHASES
from tenants import actions, planning
from tenants.models import (
    ACTIVE_RUN_STATUSES,
    QUEUED_WARNING_SECONDS,
    MigrationRun,
    Provider,
    RunKind,
    RunStatus,
    Strategy,
    Trigger,
)
from tenants.selection import missing_tenants, select_targets

EXIT_FAILED = 1
EXIT_USAGE = 2
OK_STATUSES = ("succeeded", "skipped")


class Command(BaseCommand):
    # The control plane's own settings checks and the models' (what this command relies on);
    # not the URLs', the admin's or the templates' (the web's), whose imports were a third of
    # the command's start-up here (0.5 s).
    requires_system_checks = ["controlplane", "models"]
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
        where = how.add_mutually_exclusive_group()
        where.add_argument(
            "--to",
            default="head",
            metavar="REVISION",
            help="revision to go to (default head); one below a target's revision downgrades "
            "that target, after a confirmation",
        )
        where.add_argument(
            "--phase",
            choices=PHASES,
            help="blue/green: apply only the expand (or contract) branch; contract is refused "
            "while any target in scope has not finished expand",
        )
        where.add_argument(
            "--undo-last",
            action="store_true",
            help="take each target back to the revision it had before its last successful run",
        )
        how.add_argument(
            "--yes", action="store_true", help="do not ask before downgrading (scripts)"
        )
        how.add_argument(
            "-q",
            "--quiet",
            action="store_true",
            help="print only what went wrong (and --json's output); the exit status says the rest",
        )
        mode = how.add_mutually_exclusive_group()
        mode.add_argument(
            "--dry-run",
            action="store_true",
            help="show the plan: each target's revision (read live from its database, or the "
            "record when it cannot be read), where it would go, and the SQL (or why none can be "
            "shown); change nothing",
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
        how.add_argument(
            "--skip-at-head",
            action="store_true",
            help="leave out, without reading their databases, the targets the control plane "
            "recorded at head (up to date, not drifted): a no-op pass over a large fleet in "
            "milliseconds. Only for an upgrade to head; a database changed behind the control "
            "plane's back is not seen until it is read again (a pass without this flag, or the "
            "drift check)",
        )
        how.add_argument("--json", action="store_true", help="machine-readable results on stdout")
        how.add_argument(
            "--verify",
            action="store_true",
            help="re-check the selected targets for drift from the reference schema of their "
            "revision (and their app user's grants) without migrating; exit 1 when any drifted",
        )
        how.add_argument(
            "--recover",
            action="store_true",
            help="first close runs whose worker died (no heartbeat for RUN_STALE_AFTER_SECONDS), "
            "reading each target's real revision back; alone, do only that",
        )
        how.add_argument(
            "--cancel",
            action="store_true",
            help="cancel the queued runs of the selected targets instead of migrating (a running "
            "run cannot be cancelled)",
        )
        staged = parser.add_argument_group("rollout in waves (docs/rollouts.md)")
        staged.add_argument(
            "--waves",
            metavar="SPEC",
            help="start a rollout: counts or cumulative percentages, e.g. 1,10%%,50%%,100%% "
            "(canaries first, each wave spread over regions and providers); prints its id",
        )
        staged.add_argument(
            "--max-failures",
            type=int,
            metavar="N",
            help="halt the rollout when more than N targets fail (0: the first failure; the "
            "default when no budget is given)",
        )
        staged.add_argument(
            "--max-failure-rate",
            metavar="P%%",
            help="halt the rollout when more than P%% of the targets sent so far failed",
        )
        staged.add_argument(
            "--bake",
            type=int,
            default=0,
            metavar="SECONDS",
            help="watch each finished wave this long before the next starts",
        )
        staged.add_argument(
            "--per-server",
            type=int,
            metavar="K",
            help="at most K migrations at a time on one database server (default: "
            "ROLLOUT_PER_SERVER_CONCURRENCY)",
        )
        how.add_argument(
            "--as-user",
            metavar="USERNAME",
            help="record this control-plane user as the one who triggered the runs (checked for "
            "the tenants.run_migrations permission)",
        )

    def handle(self, *args, **options):
        if options["quiet"] and not options["json"]:
            self.stdout = OutputWrapper(io.StringIO())
        self._check_usage(options)
        user = self._acting_user(options["as_user"])
        if options["recover"]:
            self._recover()
            if not self._scoped(options):
                return
        if options["cancel"]:
            return self._cancel(options, user)
        if options["verify"]:
            return self._verify(options, user)
        targets = list(self._select(options))
        if not targets:
            self._emit([], [], options)
            self.stderr.write("No target matches.")
            return
        intent = self._intent(options)
        if options["waves"] is not None:
            return self._start_rollout(targets, intent, options, user)
        rows = planning.plan(
            targets, intent, live=options["dry_run"] or options["undo_last"], sql=options["dry_run"]
        )
        if options["dry_run"]:
            return self._show_plan(rows, options)
        self._refuse_downgrades(rows, intent)
        self._confirm_downgrades(rows, options)
        dispatches = actions.do_enqueue_plan(
            rows,
            trigger=Trigger.COMMAND,
            acting_user=user,
            enqueue=not options["sync"],
        )
        if options["sync"]:
            self._run_inline(dispatches, options)
        elif options["wait"]:
            self._wait(dispatches, options)
        followed = [d for d in dispatches if d.run is not None]
        # With --wait, each target's last attempt; otherwise the run this command queued or ran.
        runs = latest_attempts(followed, retries=options["wait"])
        unrun = [d for d in dispatches if d.run is None]
        self._emit(rows, list(zip(followed, runs, strict=True)), options, unrun=unrun)
        code = self._exit_code(rows, dispatches, runs, options)
        if code:
            sys.exit(code)

    # --- what was asked -------------------------------------------------------------------

    SCOPES = ("all", "shared", "tenant", "target", "strategy", "failed", "provider", "region")

    def _scoped(self, options):
        return any(options[k] for k in self.SCOPES)

    def _check_usage(self, options):
        """Bad usage exits 2 before anything is read or queued."""
        if not options["to"].strip():
            raise CommandError(
                "--to needs a revision: head, a revision id, base, or a relative one such as -1.",
                returncode=EXIT_USAGE,
            )
        if options["timeout"] < 0:
            raise CommandError(
                f"--timeout must be 0 (wait as long as it takes) or a number of seconds, not "
                f"{options['timeout']}.",
                returncode=EXIT_USAGE,
            )
        if options["skip_at_head"] and (
            options["to"] != "head" or options["phase"] or options["undo_last"]
        ):
            raise CommandError(
                "--skip-at-head is for an upgrade to head only (not with --to REVISION, --phase "
                "or --undo-last).",
                returncode=EXIT_USAGE,
            )
        self._check_rollout_usage(options)
        if not self._scoped(options) and not options["recover"]:
            raise CommandError(
                "Say which targets: --all, --shared, --tenant ID, --target NAME, --strategy, "
                "--failed, --provider or --region.",
                returncode=EXIT_USAGE,
            )

    def _check_rollout_usage(self, options):
        staged = [
            flag
            for flag, given in (
                ("--max-failures", options["max_failures"] is not None),
                ("--max-failure-rate", options["max_failure_rate"] is not None),
                ("--bake", options["bake"]),
                ("--per-server", options["per_server"] is not None),
            )
            if given
        ]
        if options["waves"] is None:
            if staged:
                raise CommandError(
                    f"{', '.join(staged)} belong to a rollout: add --waves, e.g. "
                    "--waves 1,10%,100%.",
                    returncode=EXIT_USAGE,
                )
            return
        clashing = [
            flag
            for flag in ("phase", "undo_last", "sync", "cancel", "verify", "skip_at_head")
            if options[flag]
        ]
        if clashing:
            raise CommandError(
                "--waves starts a rollout of an upgrade through the workers; it does not go "
                f"with --{clashing[0].replace('_', '-')}.",
                returncode=EXIT_USAGE,
            )
        for flag in ("max_failures", "bake", "per_server"):
            if (options[flag] or 0) < 0:
                raise CommandError(
                    f"--{flag.replace('_', '-')} must be 0 or more.", returncode=EXIT_USAGE
                )
        if options["max_failure_rate"] is not None:
            options["max_failure_rate"] = _percentage(options["max_failure_rate"])

    def _start_rollout(self, targets, intent, options, user):
        """``--waves``: plan the rollout, show its order, record it and queue its first wave
        (``tenants.rollouts``); with ``--wait`` follow it to its end (exit 0 completed, 1
        halted)."""
        from tenants import rollouts
        from tenants.management.commands.rollout import exit_code, wait_for

        intent = planning.Intent.upgrade(intent.revision, allow_downgrade=False)
        try:
            staged = rollouts.plan_rollout(targets, intent, options["waves"])
        except rollouts.WavesError as exc:
            raise CommandError(str(exc), returncode=EXIT_USAGE) from None
        if options["dry_run"]:
            if options["json"]:
                self.stdout.write(json.dumps(staged.as_dict(), indent=2))
            else:
                self.stdout.write(staged.table())
                self.stdout.write("\nPreview: nothing was run.")
            return
        self.stderr.write(staged.table())
        if not staged.size:
            self.stderr.write("Nothing to roll out: no target can go there.")
            sys.exit(EXIT_FAILED)
        selection = {k: options[k] for k in self.SCOPES if options[k]}
        rollout = rollouts.do_start_rollout(
            staged,
            trigger=Trigger.COMMAND,
            acting_user=user,
            selection=selection,
            max_failures=options["max_failures"],
            max_failure_rate=options["max_failure_rate"],
            bake_seconds=options["bake"],
            per_server_concurrency=options["per_server"],
        )
        started = (
            f"Rollout #{rollout.pk} started: {staged.size} target(s) in {len(staged.waves)} "
            f"wave(s) to {rollout.revision}. Follow it with `manage.py rollout show {rollout.pk}`."
        )
        (self.stderr if options["json"] else self.stdout).write(started)
        if options["wait"]:
            rollout = wait_for(rollout, self.stderr, timeout=options["timeout"])
        if options["json"]:
            self.stdout.write(
                json.dumps(rollouts.describe(rollout), indent=2, cls=DjangoJSONEncoder)
            )
        elif options["wait"]:
            self.stdout.write(rollouts.show_text(rollout))
        if options["wait"]:
            code = exit_code(rollout)
            if code:
                sys.exit(code)

    def _intent(self, options):
        if options["phase"]:
            return planning.Intent.blue_green(options["phase"])
        if options["undo_last"]:
            return planning.Intent.undo()
        return planning.Intent.upgrade(
            options["to"].strip(), skip_recorded_at_head=options["skip_at_head"]
        )

    def _refuse_downgrades(self, rows, intent):
        """A downgrade (or an undo) runs for every selected target or for none: a refused row
        stops it before anything is queued (exit 2)."""
        downgrading = intent.action == planning.UNDO or any(
            row.kind == RunKind.DOWNGRADE for row in rows
        )
        refused = [row for row in rows if row.blocks]
        if downgrading and refused:
            raise CommandError(
                f"{'Undo' if intent.action == planning.UNDO else 'Downgrade'} refused before "
                "anything ran:\n  "
                + "\n  ".join(f"{row.target.name}: {row.refusal}" for row in refused),
                returncode=EXIT_USAGE,
            )

    def _confirm_downgrades(self, rows, options):
        """Ask before downgrading, unless --yes."""
        lines = [
            f"  {row.target.name}: {row.stands or 'base'} -> {row.goes_to} ({row.source})"
            for row in rows
            if row.accepted and row.kind == RunKind.DOWNGRADE
        ]
        if not lines or options["yes"]:
            return
        self.stderr.write(f"This downgrades {len(lines)} target(s):\n" + "\n".join(lines[:50]))
        if not sys.stdin or not sys.stdin.isatty():
            raise CommandError(
                "Downgrades need a confirmation: run it in a terminal, or pass --yes.",
                returncode=EXIT_USAGE,
            )
        answer = input("Type 'yes' to downgrade: ")
        if answer.strip().lower() != "yes":
            raise CommandError("Nothing was done.", returncode=EXIT_USAGE)

    def _exit_code(self, rows, dispatches, runs, options):
        """1 when a target was refused, a request was not carried out (another run under way
        does something else, a region no cluster serves, the broker refused it), or, with
        --sync or --wait, a run did not succeed. A held target is skipped on purpose: said,
        and not a failure."""
        if any(row.blocks for row in rows):
            return EXIT_FAILED
        if any(not d.carried_out and not d.target.held for d in dispatches):
            return EXIT_FAILED
        if options["sync"] or options["wait"]:
            if any(run.status not in OK_STATUSES for run in runs):
                return EXIT_FAILED
        return 0

    def _recover(self):
        from migrator.tasks import recover_stale_runs

        lines = recover_stale_runs()
        for line in lines:
            self.stderr.write(line)
        self.stderr.write(f"Recovered {len(lines)} abandoned run(s).")
        self._say_still_queued()

    def _say_still_queued(self):
        """After --recover: the queued runs it left (not yet RUN_QUEUED_TIMEOUT_SECONDS in a
        queue that stands still), and what to do now if the broker lost them."""
        from django.conf import settings
        from django.utils import timezone

        queued = list(
            MigrationRun.objects.filter(status=RunStatus.QUEUED)
            .select_related("target")
            .order_by("created_at")[:21]
        )
        if not queued:
            return
        waited = int((timezone.now() - queued[0].created_at).total_seconds())
        shown = ", ".join(f"#{run.pk} {run.target.name}" for run in queued[:20])
        more = " …" if len(queued) > 20 else ""
        self.stderr.write(
            f"{len(queued) if len(queued) <= 20 else 'More than 20'} run(s) still queued "
            f"({shown}{more}; the oldest for {waited}s): a queued run is closed as abandoned "
            f"only after RUN_QUEUED_TIMEOUT_SECONDS ({settings.RUN_QUEUED_TIMEOUT_SECONDS} s) "
            "in a queue that does not move. If the broker lost them (Redis restarted without "
            "persistence), cancel them now and trigger again: `migrate_tenants --cancel "
            "--all`, then the command you ran."
        )

    # --- modes ----------------------------------------------------------------------------

    def _verify(self, options, user):
        """Verify the selected targets now (``migrator.tasks.verify_records``), in this process."""
        from migrator.tasks import verify_records

        targets = self._select(options)
        results = verify_records(
            targets, trigger=Trigger.COMMAND, acting_user=user, record_every_run=True
        )
        if options["json"]:
            self.stdout.write(json.dumps([verification_as_dict(v) for v in results], indent=2))
        elif results:
            self.stdout.write(verification_table(results))
        else:
            self.stderr.write("No target matches.")
        if any(v.drifted for v in results):
            sys.exit(EXIT_FAILED)

    def _cancel(self, options, user):
        """``--cancel``: cancel the selected targets' queued runs (``do_cancel_queued_runs``)."""
        cancelled, running = actions.do_cancel_queued_runs(self._select(options), acting_user=user)
        if options["json"]:
            self.stdout.write(json.dumps([run.outcome() for run in cancelled + running], indent=2))
        for run in cancelled:
            self.stderr.write(f"Run #{run.pk} for {run.target.name} cancelled; nothing ran.")
        for run in running:
            self.stderr.write(
                f"Run #{run.pk} for {run.target.name} is running and cannot be cancelled (it "
                "holds the target's lock): it ends by itself, or `--recover` closes it if its "
                "worker died."
            )
        self.stderr.write(f"Cancelled {len(cancelled)} queued run(s).")

    def _run_inline(self, dispatches, options):
        from migrator.tasks import run_migration

        created = [d.run for d in dispatches if d.created]
        for index, run in enumerate(created, 1):
            run_migration(run.pk)
            run.refresh_from_db(fields=["status"])
            if not (options["json"] or options["quiet"]):
                self.stderr.write(f"[{index}/{len(created)}] {run.target.name}: {run.status}")

    def _wait(self, dispatches, options):
        """Show progress by target until each target's last attempt has ended: a retryable
        failure queues the next attempt in the same batch (``actions.do_schedule_retry``), so a
        failed attempt with attempts left is not the end of its target."""
        followed = [d for d in dispatches if d.run is not None]
        progress = Progress(
            self.stderr, len(followed), enabled=not (options["json"] or options["quiet"])
        )
        deadline = time.monotonic() + options["timeout"] if options["timeout"] else None
        quiet_until = time.monotonic() + QUEUED_WARNING_SECONDS
        while True:
            counts = {}
            runs = latest_attempts(followed, fields=_PROGRESS_FIELDS)
            for run in runs:
                if not attempt_pending(run):
                    counts[run.status] = counts.get(run.status, 0) + 1
            if quiet_until and time.monotonic() > quiet_until:
                quiet_until = None
                if runs and not any(run.started_at for run in runs):
                    self._warn_nothing_started()
            progress.update(counts)
            if sum(counts.values()) >= len(followed):
                progress.finish()
                return
            if deadline and time.monotonic() > deadline:
                progress.finish()
                self.stderr.write(
                    f"Gave up waiting after {options['timeout']}s; the runs go on in the workers."
                )
                return
            time.sleep(0.25)

    def _warn_nothing_started(self):
        from django.conf import settings
        from django_q.conf import Conf

        self.stderr.write(
            f"\nNothing has started after {QUEUED_WARNING_SECONDS}s: no worker has taken these "
            f"runs. Is a `manage.py qcluster` running for their queue ({Conf.CLUSTER_NAME!r}, or "
            "the region's cluster in REGION_CLUSTERS), with this command's DATABASE_URL, "
            "REDIS_URL, SECRET_KEY and Q_SITE_NAME? Runs still waiting after "
            f"RUN_QUEUED_TIMEOUT_SECONDS ({settings.RUN_QUEUED_TIMEOUT_SECONDS}s) while their "
            "queue stands still are closed as abandoned (`migrate_tenants --recover`); "
            "`migrate_tenants --cancel` cancels them."
        )

    def _show_plan(self, rows, options):
        """``--dry-run``: each target's row of the plan, with its SQL; nothing is queued.
        Exit 1 when a target is refused or its live revision could not be read."""
        if options["json"]:
            self.stdout.write(json.dumps([row.as_dict() for row in rows], indent=2))
        else:
            self.stdout.write(plan_table(rows))
            for row in rows:
                if row.sql or row.no_sql:
                    self.stdout.write(
                        f"\n-- {row.target.name} ({row.target.provider}): "
                        f"{row.kind} from {row.stands or 'base'} ({row.source}) "
                        f"to {row.goes_to} --"
                    )
                    self.stdout.write(row.sql or f"-- {row.no_sql}")
        if any(row.refusal or row.source_note for row in rows):
            sys.exit(EXIT_FAILED)

    # --- helpers --------------------------------------------------------------------------

    def _select(self, options):
        """The targets the scope and filter options name (``tenants.selection``)."""
        unknown = missing_tenants(options["tenant"])
        if unknown:
            raise CommandError(
                f"Unknown tenant id(s): {', '.join(unknown)}.", returncode=EXIT_USAGE
            )
        return select_targets(
            all_targets=options["all"],
            shared=options["shared"],
            tenant_ids=options["tenant"],
            target_names=options["target"],
            strategies=options["strategy"],
            providers=options["provider"],
            regions=options["region"],
            failed=options["failed"],
        )

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

    def _emit(self, rows, results, options, unrun=()):
        """The outcome: a run per queued row (``results``: (dispatch, its latest attempt)),
        every row that was not queued, with why, and every accepted row the queueing action
        left without a run (``unrun``: e.g. a region no cluster serves)."""
        not_queued = [row for row in rows if not row.accepted]
        if options["json"]:
            payload = (
                [
                    {
                        **run.outcome(),
                        **({} if d.carried_out else {"reason": d.message}),
                    }
                    for d, run in results
                ]
                + [_not_queued_as_dict(row) for row in not_queued]
                + [
                    {"target": d.target.name, "status": "not-queued", "error": d.reason}
                    for d in unrun
                ]
            )
            self.stdout.write(json.dumps(payload, indent=2))
            return
        at_head = sum(row.recorded_at_head for row in not_queued)
        if at_head:
            self.stderr.write(
                f"{at_head} target(s) recorded at head: left alone without reading their "
                "databases (--skip-at-head)."
            )
        by_reason = {}
        for row in not_queued:
            if not row.recorded_at_head:
                by_reason.setdefault(row.reason, []).append(row.target.name)
        for reason, names in by_reason.items():
            self.stderr.write(f"Not queued for {', '.join(names[:50])}: {reason}.")
        for dispatch, _ in results:
            if not dispatch.created or dispatch.unqueued:
                self.stderr.write(dispatch.message)
        for dispatch in unrun:
            self.stderr.write(dispatch.message)
        if results:
            self.stdout.write(summary_table([run for _, run in results]))
        if options["quiet"]:
            # The table is not shown: the runs that went wrong are, each on one line.
            for _, run in results:
                if run.status in (RunStatus.FAILED, RunStatus.INTERRUPTED, RunStatus.CANCELLED):
                    self.stderr.write(
                        f"{run.target.name}: {run.status}: {run.error or run.reason}".rstrip()
                    )


def _percentage(text):
    """``10%`` or ``10`` as 10.0; a usage error otherwise."""
    try:
        value = float(str(text).strip().rstrip("%"))
    except ValueError:
        value = -1
    if not 0 <= value <= 100:
        raise CommandError(
            f"--max-failure-rate {text!r}: give a percentage from 0% to 100%, e.g. 10%.",
            returncode=EXIT_USAGE,
        )
    return value


def _not_queued_as_dict(row):
    if row.recorded_at_head:
        return {
            "target": row.target.name,
            "status": "recorded-at-head",
            "revision": row.stands,
            "last_checked_at": row.target.last_checked_at
            and row.target.last_checked_at.isoformat(),
        }
    return {**row.as_dict(), "status": "not-queued", "error": row.reason}


_PROGRESS_FIELDS = (
    "pk",
    "batch",
    "target_id",
    "attempt",
    "status",
    "retryable",
    "started_at",
    "finished_at",
)


def latest_attempts(dispatches, *, fields=None, retries=True):
    """For each dispatch with a run, the latest attempt of that run (a retry is a new run of
    the same batch and target), in order; one query over the batches. With ``fields``, light
    rows (a ``SimpleNamespace`` of those fields, for the progress poll) instead of runs.
    ``retries=False``: each dispatch's own run, as it is now (read again only when it is no
    longer queued: a queued run is as it was queued)."""
    from types import SimpleNamespace

    followed = [d for d in dispatches if d.run is not None]
    if not followed:
        return []
    if not retries:
        moved = (
            MigrationRun.objects.select_related("target")
            .exclude(status=RunStatus.QUEUED)
            .in_bulk([d.run.pk for d in followed])
        )
        return [moved.get(d.run.pk, d.run) for d in followed]
    wanted = {(d.run.batch, d.target.pk) for d in followed}
    runs = MigrationRun.objects.filter(batch__in={batch for batch, _ in wanted})
    if fields:
        runs = (SimpleNamespace(**values) for values in runs.values(*fields))
    else:
        runs = runs.select_related("target")
    latest = {}
    for run in runs:
        key = (run.batch, run.target_id)
        if key not in wanted:
            continue
        if key not in latest or (run.attempt, run.pk) > (latest[key].attempt, latest[key].pk):
            latest[key] = run
    return [latest.get((d.run.batch, d.target.pk), d.run) for d in followed]


def attempt_pending(run):
    """Whether ``run``'s target is not done yet: the run is queued or running, or it failed
    with a retryable error and has attempts left, so that its next attempt is about to be
    queued (the retry is written just after the failure). Bounded: a failure a minute old
    with no successor is final (another run took the target)."""
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    if run.status in ACTIVE_RUN_STATUSES:
        return True
    return bool(
        run.status == RunStatus.FAILED
        and run.retryable
        and run.attempt < settings.RUN_MAX_ATTEMPTS
        and run.finished_at
        and run.finished_at > timezone.now() - timedelta(seconds=60)
    )


def first_line(text, width):
    """The first line of ``text`` in at most ``width`` characters, cut between words."""
    if not text:
        return ""
    return textwrap.shorten(text.splitlines()[0], width, placeholder=" …")


def stands_cell(row):
    """Where a row's target stands: ``?`` when its database could not be read and nothing is
    recorded (the note says why), never ``base`` for a database nobody read."""
    if row.stands:
        return row.stands
    return "?" if row.source_note else "base"


def plan_table(rows):
    """The plan as a plain-text table: where each target stands (and whether that was read
    live or from the record), where it goes, how many revisions, and why not when it does not."""
    header = ("TARGET", "PROVIDER", "KIND", "STANDS AT", "FROM", "GOES TO", "STEPS", "NOTE")
    table = [
        (
            row.target.name,
            row.target.provider,
            row.kind,
            stands_cell(row),
            row.source,
            row.goes_to,
            "" if not row.steps_known else str(len(row.steps)),
            first_line(row.reason or row.source_note or row.no_sql, 120),
        )
        for row in rows
    ]
    widths = [max(len(str(r[i])) for r in [header, *table]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(r, widths, strict=True)).rstrip()
        for r in [header, *table]
    ]
    lines += _in_full(
        ((row.target.name, row.reason or row.source_note or row.no_sql) for row in rows), cut=120
    )
    counts = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    lines.append("")
    lines.append(
        "Preview: nothing was run. "
        + ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    )
    return "\n".join(lines)


def summary_table(runs):
    """A plain-text table, one row per run, and a count line under it."""
    header = ("TARGET", "PROVIDER", "STATUS", "REVISION", "APPLIED", "MS", "ERROR")
    rows = [
        (
            run.target.name,
            run.target.provider,
            run.status,
            f"{run.stood_at} -> {run.ended_at_revision}"
            if run.finished_at
            else run.requested_revision,
            str(len(run.applied)),
            "" if run.duration_ms is None else str(run.duration_ms),
            first_line(run.error, 100),
        )
        for run in runs
    ]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines += _in_full((run.target.name, run.error.splitlines()[0]) for run in runs if run.error)
    counts = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    lines.append("")
    lines.append(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return "\n".join(lines)


def _in_full(notes, cut=100):
    """Under a table, each note or error its column cut short, whole: "  name: text" (a
    truncated "Create it with: vault kv put secret/datab" tells nobody what to do)."""
    lines = [
        f"  {name}: {text}"
        for name, text in notes
        if text and (len(text.splitlines()[0]) > cut or len(text.splitlines()) > 1)
    ]
    return ["", *lines] if lines else []


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


def verification_as_dict(verification):
    return {
        "target": verification.target,
        "provider": verification.provider,
        "revision": verification.revision,
        "result": verification.outcome,
        "fingerprint": verification.fingerprint or None,
        "reference_fingerprint": verification.reference_fingerprint or None,
        "differences": verification.differences,
        "not_verified": verification.not_verified or None,
        "grant_problems": verification.grant_problems,
        "grants_not_checked": (
            verification.grants.not_checked or None if verification.grants else None
        ),
    }


def verification_table(results):
    """One row per verified target, then every difference and grant problem in full."""
    header = ("TARGET", "PROVIDER", "REVISION", "RESULT", "FINGERPRINT", "DETAILS")
    rows = []
    for v in results:
        if v.drifted:
            details = f"{len(v.differences)} difference(s)"
        else:
            details = v.not_verified
        if v.grant_problems:
            details = f"{details}; {len(v.grant_problems)} grant problem(s)".lstrip("; ")
        rows.append(
            (
                v.target,
                v.provider,
                v.revision or ("?" if v.outcome == "not-verified" else "base"),
                v.outcome,
                v.fingerprint[:12],
                details,
            )
        )
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    for v in results:
        for line in v.differences + v.grant_problems:
            lines.append(f"{v.target}: {line}")
    drifted = sum(v.drifted for v in results)
    unverified = sum(not v.verified for v in results)
    lines.append("")
    lines.append(
        f"{len(results)} checked, {drifted} drifted, {unverified} not verified, "
        f"{sum(bool(v.grant_problems) for v in results)} with grant problems"
    )
    return "\n".join(lines)
