"""``manage.py migrate_tenants``: migrate tenant databases from a shell, a CI pipeline or cron.

Whoever can run this command has shell access to the control plane and its settings, so it acts
as an operator. ``--as-user NAME`` records (and checks) a control-plane user instead: the user
needs the ``tenants.run_migrations`` permission.
"""

import json
import sys
import time
import uuid
from dataclasses import dataclass, field

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from migrator.phases import PHASES
from tenants import actions
from tenants.models import (
    FINISHED_RUN_STATUSES,
    MigrationRun,
    Provider,
    RunKind,
    RunStatus,
    Strategy,
    TargetStatus,
    Trigger,
)
from tenants.selection import missing_tenants, select_targets


@dataclass
class Plan:
    """Runs of one kind to one revision for a group of targets."""

    kind: str
    revision: str
    phase: str = ""
    targets: list = field(default_factory=list)


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
        if options["verify"]:
            return self._verify(options, user, scopes)
        targets = list(self._select(options))
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

        plans = self._plans(targets, options)
        at_head = []
        if options["skip_at_head"]:
            plans, at_head = self._leave_out_recorded_at_head(plans, options)
        if options["dry_run"]:
            return self._dry_run(plans, options)
        if any(plan.kind == RunKind.DOWNGRADE for plan in plans):
            self._confirm_downgrades(plans, options)

        batch = uuid.uuid4()
        dispatches = []
        for plan in plans:
            dispatches += actions.do_enqueue_runs(
                plan.targets,
                trigger=Trigger.COMMAND,
                acting_user=user,
                revision=plan.revision,
                kind=plan.kind,
                phase=plan.phase,
                batch=batch,
                enqueue=not options["sync"],
            )
        unqueued = [d for d in dispatches if d.unqueued]
        for dispatch in unqueued:
            self.stderr.write(dispatch.message)
        if options["sync"]:
            self._run_inline(dispatches, options)
        elif options["wait"]:
            self._wait(dispatches, options)
        runs = self._reload(dispatches)
        self._emit(runs, options, dispatches=dispatches, at_head=at_head)
        if unqueued:
            sys.exit(EXIT_FAILED)
        if options["sync"] or options["wait"]:
            failed = [r for r in runs if r.status not in OK_STATUSES]
            if failed:
                sys.exit(EXIT_FAILED)

    # --- what to do to which target ------------------------------------------------------

    def _plans(self, targets, options):
        """Group the targets by what each needs: (kind, revision, phase)."""
        from migrator import phases, rollback

        if options["phase"]:
            phase = options["phase"]
            if not phases.has_phases():
                raise CommandError(
                    "The script directory has no expand/contract branches (revisions with "
                    "branch_labels=('expand',) and ('contract',)).",
                    returncode=EXIT_USAGE,
                )
            if phase == phases.CONTRACT:
                lagging = phases.lagging_on_expand(targets)
                if lagging:
                    names = ", ".join(t.name for t in lagging[:50])
                    raise CommandError(
                        f"Contract refused: {len(lagging)} target(s) have not finished the "
                        f"expand phase: {names}. Run `migrate_tenants --phase expand` for them "
                        "first (and deploy the new application), then contract.",
                        returncode=EXIT_FAILED,
                    )
            return [Plan(RunKind.UPGRADE, phases.destination(phase), phase, list(targets))]
        if options["undo_last"]:
            by_destination = {}
            for target in targets:
                last = (
                    target.runs.filter(kind=RunKind.UPGRADE, status=RunStatus.SUCCEEDED)
                    .order_by("-finished_at", "-id")
                    .first()
                )
                if last is None:
                    self.stderr.write(f"{target.name}: no successful run to undo; left alone.")
                    continue
                destination = last.revision_before or "base"
                by_destination.setdefault(destination, []).append(target)
            return [
                Plan(RunKind.DOWNGRADE, destination, "", group)
                for destination, group in by_destination.items()
            ]
        revision = options["to"]
        downgrades = [t for t in targets if rollback.is_downgrade(t.revision, revision)]
        upgrades = [t for t in targets if t not in downgrades]
        plans = []
        if upgrades:
            plans.append(Plan(RunKind.UPGRADE, revision, "", upgrades))
        if downgrades:
            plans.append(Plan(RunKind.DOWNGRADE, revision, "", downgrades))
        return plans

    def _leave_out_recorded_at_head(self, plans, options):
        """``--skip-at-head``: (the plans without the targets recorded at head, those targets)."""
        from migrator import runner

        if options["to"] != "head" or options["phase"] or options["undo_last"]:
            raise CommandError(
                "--skip-at-head is for an upgrade to head only (not with --to REVISION, --phase "
                "or --undo-last).",
                returncode=EXIT_USAGE,
            )
        heads = runner.heads()
        at_head = []
        for plan in plans:
            if plan.kind != RunKind.UPGRADE:
                continue
            recorded = [
                t
                for t in plan.targets
                if t.status == TargetStatus.UP_TO_DATE
                and not t.drifted
                and actions.target_status_for(t.revision, heads) == TargetStatus.UP_TO_DATE
            ]
            if recorded:
                left = set(recorded)
                plan.targets = [t for t in plan.targets if t not in left]
                at_head += recorded
        if at_head and not options["json"]:
            self.stderr.write(
                f"{len(at_head)} target(s) recorded at head: left alone without reading their "
                "databases (--skip-at-head)."
            )
        return [plan for plan in plans if plan.targets], at_head

    def _confirm_downgrades(self, plans, options):
        """Refuse irreversible downgrades; ask before the others unless --yes."""
        from migrator import rollback
        from migrator.exceptions import MigratorError

        lines, problems = [], []
        for plan in plans:
            if plan.kind != RunKind.DOWNGRADE:
                continue
            for target in plan.targets:
                lines.append(f"  {target.name}: {target.revision or 'base'} -> {plan.revision}")
                try:
                    found = rollback.irreversible(target.revision, plan.revision)
                except MigratorError as exc:
                    problems.append(f"{target.name}: {exc}")
                    continue
                problems += [f"{target.name}: {p}" for p in found]
        if problems:
            raise CommandError(
                "Downgrade refused before anything ran:\n  " + "\n  ".join(problems),
                returncode=EXIT_USAGE,
            )
        if options["yes"]:
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

    # --- modes ----------------------------------------------------------------------------

    def _verify(self, options, user, scopes):
        """Verify the selected targets now (``migrator.verify.verify_records``), in this process."""
        from migrator.verify import verify_records

        if not any(options[k] for k in scopes):
            raise CommandError(
                "Say which targets to verify: --all, --shared, --tenant ID, --target NAME, "
                "--strategy, --failed, --provider or --region.",
                returncode=EXIT_USAGE,
            )
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

    def _run_inline(self, dispatches, options):
        from migrator.tasks import run_migration

        created = [d.run for d in dispatches if d.created]
        for index, run in enumerate(created, 1):
            run_migration(run.pk)
            run.refresh_from_db(fields=["status"])
            if not options["json"]:
                self.stderr.write(f"[{index}/{len(created)}] {run.target.name}: {run.status}")

    def _wait(self, dispatches, options):
        from django.db.models import Count, Q

        runs = [d.run for d in dispatches if d.run is not None]
        total = len(runs)
        # The runs this command queued share its batch; a run already under way for a target
        # (queued by someone else) is waited for by id. One small query per poll, whatever N.
        batches = {d.run.batch for d in dispatches if d.created}
        others = [d.run.pk for d in dispatches if d.run is not None and not d.created]
        mine = Q(batch__in=batches) if batches else Q(pk__in=[])
        progress = Progress(self.stderr, total, enabled=not options["json"])
        deadline = time.monotonic() + options["timeout"] if options["timeout"] else None
        while True:
            counts = dict.fromkeys(FINISHED_RUN_STATUSES, 0)
            finished = (
                MigrationRun.objects.filter(mine | Q(pk__in=others))
                .filter(status__in=FINISHED_RUN_STATUSES)
                .values("status")
                .annotate(count=Count("pk"))
            )
            for row in finished:
                counts[row["status"]] += row["count"]
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

    def _dry_run(self, plans, options):
        """Print the SQL each target would run, from the revision it is at now (read live)."""
        from migrator import runner
        from migrator.exceptions import MigratorError
        from migrator.secrets import get_secrets_manager
        from migrator.targets import Target

        secrets = get_secrets_manager()
        results = []
        for plan in plans:
            for record in plan.targets:
                entry = {"target": record.name, "provider": record.provider, "kind": plan.kind}
                try:
                    connection = secrets.migration_credentials(
                        record.effective_vault_path, provider=record.provider
                    )
                    target = Target(record.name, connection)
                    state = runner.current(target)
                    preview = runner.sql_preview(
                        target, state.revision, plan.revision, kind=plan.kind
                    )
                    entry.update(revision_before=state.revision, sql=preview.sql, status="preview")
                except MigratorError as exc:
                    entry.update(status="failed", error=str(exc))
                results.append(entry)
                if not options["json"]:
                    self.stdout.write(f"-- {record.name} ({record.provider}, {plan.kind}) --")
                    self.stdout.write(entry.get("sql") or f"-- error: {entry['error']}")
        if options["json"]:
            self.stdout.write(json.dumps(results, indent=2))
        if any(r["status"] == "failed" for r in results):
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

    def _reload(self, dispatches):
        ids = [d.run.pk for d in dispatches if d.run is not None]
        by_id = MigrationRun.objects.select_related("target").in_bulk(ids)
        return [by_id[i] for i in ids]

    def _emit(self, runs, options, dispatches=(), at_head=()):
        skipped = [d for d in dispatches if d.run is None]
        if options["json"]:
            payload = (
                [run.outcome() for run in runs]
                + [
                    {"target": d.target.name, "status": "not-queued", "error": d.reason}
                    for d in skipped
                ]
                + [
                    {
                        "target": t.name,
                        "status": "recorded-at-head",
                        "revision": t.revision,
                        "last_checked_at": t.last_checked_at and t.last_checked_at.isoformat(),
                    }
                    for t in at_head
                ]
            )
            self.stdout.write(json.dumps(payload, indent=2))
            return
        for d in skipped:
            self.stderr.write(d.message)
        if runs:
            self.stdout.write(summary_table(runs))


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
            (v.target, v.provider, v.revision or "base", v.outcome, v.fingerprint[:12], details)
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
