"""The planner: what a request would do to each target, before anything is queued.

Every entry point (the admin's actions, ``migrate_tenants``, ``POST /api/tenants/<id>/migrate``,
``startup_migrations``, the tenant-created signal) turns its request into an ``Intent``, asks
``plan`` for one ``PlanRow`` per target, renders the rows (a confirmation page, a table,
``--json``, an API body) and hands them to ``tenants.actions.do_enqueue_plan``, which queues the
accepted ones. A plan is a value: every interface shows the same rows, and what is queued is
what was shown (Terraform's plan/apply).

A row says where its target stands (the revision recorded by the control plane, or the one read
live from its ``alembic_version`` when the caller asks), where it would go, the revisions on the
way, the SQL (Alembic's offline rendering, when asked) or why no SQL can be shown, and, when the
target cannot or will not go there, why: a refusal (something is wrong: an irreversible
downgrade, a held target, the contract gate, an undo that no longer applies) or a reason it is
left out (nothing to undo, already there, ``--skip-at-head``). One target's problem never
raises: it is that target's row.
"""

import logging
import re
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from sqlalchemy import exc as sa_exc

from migrator import phases, rollback, runner
from migrator.exceptions import (
    MigratorError,
    ScriptDirectoryUnreadable,
    VaultAuthError,
    VaultUnavailable,
)
from tenants.models import MigrationRun, RunKind, RunStatus, TargetStatus

logger = logging.getLogger("tenants.planning")

# What an intent asks for.
UPGRADE = "upgrade"  # to a revision: one below where a target stands downgrades it ("--to")
DOWNGRADE = "downgrade"  # to a revision below every selected target (the admin's picker)
UNDO = "undo"  # back to where each target stood before its last successful run
PHASE = "phase"  # blue/green: the head of the expand or contract branch

LIVE = "live"
RECORD = "record"
RECORDED_AT_HEAD = "recorded at head (--skip-at-head): left alone, its database unread"


@dataclass(frozen=True)
class Intent:
    """What the user asked for, before it is matched with each target."""

    action: str = UPGRADE
    revision: str = "head"
    phase: str = ""
    # False: a row that would downgrade is refused (the HTTP API unless the body allows it).
    allow_downgrade: bool = True
    # ``--skip-at-head``: leave out, unread, the targets recorded at head.
    skip_recorded_at_head: bool = False

    @classmethod
    def upgrade(cls, revision="head", **kwargs):
        return cls(UPGRADE, revision, **kwargs)

    @classmethod
    def downgrade(cls, revision):
        return cls(DOWNGRADE, revision)

    @classmethod
    def undo(cls):
        return cls(UNDO, "")

    @classmethod
    def blue_green(cls, phase):
        return cls(PHASE, phases.destination(phase) if phase in phases.PHASES else "", phase)


@dataclass
class PlanRow:
    """What a request would do to one target."""

    target: object  # a MigrationTarget
    kind: str  # the run's kind: "upgrade" or "downgrade"
    destination: str  # what the run asks Alembic for: "head", a revision, "expand@head", "r@-1"
    phase: str = ""
    stands: str = ""  # the revision it stands at ("" for an empty database)
    source: str = RECORD  # where ``stands`` comes from: LIVE (its alembic_version) or RECORD
    source_note: str = ""  # why the live revision could not be read, when it was asked for
    steps: list = field(default_factory=list)  # revisions applied (or reverted), in run order
    steps_known: bool = False  # False: Alembic could not say (the row's refusal says why)
    sql: str = ""
    no_sql: str = ""  # why no SQL is shown, when SQL was asked for
    refusal: str = ""  # why the target cannot go there; nothing is queued for it
    left_out: str = ""  # why nothing is queued for it, on purpose (not a problem)
    undoes: object = None  # the MigrationRun an undo takes back

    @property
    def accepted(self):
        return not self.refusal and not self.left_out

    @property
    def status(self):
        """``refused``, ``left-out``, ``nothing-to-do`` (as far as ``source`` says) or ``ready``."""
        if self.refusal:
            return "refused"
        if self.left_out:
            return "left-out"
        if self.steps_known and not self.steps:
            return "nothing-to-do"
        return "ready"

    @property
    def blocks(self):
        """Whether the refusal stops a request that runs for every target or none (a
        downgrade, an undo): any refusal but a held or decommissioned target, which every
        request skips."""
        return bool(self.refusal) and not self.target.held and self.target.decommissioned_at is None

    @property
    def recorded_at_head(self):
        return self.left_out == RECORDED_AT_HEAD

    @property
    def reason(self):
        return self.refusal or self.left_out

    @property
    def goes_to(self):
        """Where the target ends when the row runs (where it stands when nothing is queued)."""
        if not self.accepted:
            return self.stands or "base"
        if self.undoes is not None:
            return self.undoes.revision_before or "base"
        return self.destination

    def as_dict(self):
        """The row as plain data (``migrate_tenants --json``, the HTTP API)."""
        return {
            "target": self.target.name,
            "provider": self.target.provider,
            "kind": self.kind,
            "phase": self.phase or None,
            "status": self.status,
            "stands_at": self.stands or None,
            "source": self.source,
            "source_note": self.source_note or None,
            "destination": self.destination,
            "goes_to": self.goes_to,
            "steps": self.steps if self.steps_known else None,
            "sql": self.sql or None,
            "no_sql": self.no_sql or None,
            "reason": self.reason or None,
            "undoes_run": self.undoes.pk if self.undoes is not None else None,
        }


def plan(targets, intent, *, live=False, sql=False):
    """One ``PlanRow`` per target of ``targets`` (``MigrationTarget``\\ s), in order, for
    ``intent``.

    ``live``: read where each target stands from its ``alembic_version`` (its admin
    credentials read from Vault at ``{mount}/data/{secrets path}/{effective_vault_path}``);
    when that fails, the row uses the recorded revision and says why in ``source_note``.
    After a Vault-wide failure (Vault unreachable, login refused) the other targets are not
    tried. ``sql``: render the SQL of each accepted row with Alembic's offline mode (no
    connection), or say why it cannot be.
    Never raises for one target's problem. A script directory that cannot be read (a
    revision importing a module this process cannot import) refuses every row with
    ``ScriptDirectoryUnreadable``'s message, which names the file and what to do.
    """
    targets = list(targets)
    planner = _Planner(intent, live=live, sql=sql)
    try:
        runner.script_directory()
    except ScriptDirectoryUnreadable as exc:
        # Nothing can be planned from it (steps, phases, heads, downgrades): one refusal for
        # every entry point alike, instead of a traceback from whichever reads it first.
        planner.unreadable = str(exc)
    rows = [planner.where_it_stands(target) for target in targets]
    if planner.unreadable:
        for row in rows:
            row.refusal = planner.unreadable
        return rows
    if intent.action == UNDO:
        planner.last_runs = _last_successful_runs(targets)
        planner.last_failures = _last_failed_runs(targets)
    if intent.action == PHASE:
        planner.gate(rows)
    for row in rows:
        if not row.refusal:
            planner.route(row)
        if sql and row.accepted and row.steps:
            planner.render(row)
    return rows


def downgrade_choices(targets):
    """The revisions every one of ``targets`` can be downgraded to, newest first, ``base``
    last: what the admin's picker offers (its first entry is the default, the revision just
    below them). Read from the record; the confirmation page then plans each target.
    Raises ``ScriptDirectoryUnreadable`` when the script directory cannot be read."""
    script = runner.script_directory()
    order = [revision.revision for revision in script.walk_revisions()]  # newest first
    common = None
    for stands in {target.revision or "" for target in targets}:
        reachable = set()
        if stands:
            below = phases.applied(stands) - set(stands.split(","))
            for revision in below:
                try:
                    rollback.downgrade_steps(stands, revision)
                except MigratorError:
                    continue
                reachable.add(revision)
            reachable.add("base")
        common = reachable if common is None else common & reachable
    if not common:
        return []
    return [revision for revision in order if revision in common] + ["base"]


class _Planner:
    def __init__(self, intent, *, live, sql):
        self.intent = intent
        self.live = live
        self.sql = sql
        self.vault_down = ""  # after a Vault-wide failure: its message
        self.heads = None
        self.unreadable = ""  # the script directory cannot be read: why (every row's refusal)
        self.last_runs = {}  # target id -> its last successful upgrade or downgrade (undo)
        self.last_failures = {}  # target id -> (pk, status) of its last failed one (undo)
        self._steps = {}  # (kind, stands, destination) -> (steps, error)
        self._irreversible = {}

    # --- where each target stands ---------------------------------------------------------

    def where_it_stands(self, target):
        intent = self.intent
        row = PlanRow(target, RunKind.UPGRADE, intent.revision, phase=intent.phase)
        row.stands = target.revision or ""
        skipped = (
            intent.skip_recorded_at_head and not self.unreadable and self._recorded_at_head(target)
        )
        if self.live and not skipped:
            self._read_live(row)
        return row

    def _read_live(self, row):
        from migrator.tasks import read_revision

        if self.vault_down:
            row.source_note = f"not read: {self.vault_down}"
            return
        try:
            row.stands = read_revision(row.target) or ""
            row.source = LIVE
        except (VaultUnavailable, VaultAuthError) as exc:
            self.vault_down = str(exc)
            row.source_note = str(exc)
        except MigratorError as exc:
            row.source_note = str(exc)

    def _recorded_at_head(self, target):
        from tenants.actions import target_status_for

        if self.heads is None:
            self.heads = runner.heads()
        return (
            target.status == TargetStatus.UP_TO_DATE
            and not target.drifted
            and target_status_for(target.revision, self.heads) == TargetStatus.UP_TO_DATE
        )

    # --- the contract gate ----------------------------------------------------------------

    def gate(self, rows):
        """A phase: refused everywhere when the script directory has no phases, or, for
        contract, when any target in the selection has not finished expand."""
        if not phases.has_phases():
            for row in rows:
                row.refusal = (
                    "The script directory has no expand/contract branches (revisions with "
                    "branch_labels=('expand',) and ('contract',))."
                )
            return
        if self.intent.phase != phases.CONTRACT:
            return
        lagging = [row for row in rows if not phases.state(row.stands).expand]
        if not lagging:
            return
        names = ", ".join(row.target.name for row in lagging[:50])
        reason = (
            f"Contract refused: {len(lagging)} target(s) have not finished the expand phase: "
            f"{names}. Run `migrate_tenants --phase expand` for them first (and deploy the new "
            "application), then contract"
        )
        for row in rows:
            row.refusal = reason

    # --- where each target goes -----------------------------------------------------------

    def route(self, row):
        intent, target = self.intent, row.target
        if target.decommissioned_at is not None:
            row.refusal = target.decommissioned_reason
            return
        if target.held:
            row.refusal = "the target is held; clear Held on it in the admin to migrate it"
            return
        if intent.skip_recorded_at_head and self._recorded_at_head(target):
            row.left_out = RECORDED_AT_HEAD
            return
        if intent.action == UNDO:
            self._undo(row)
        elif intent.action == DOWNGRADE:
            self._downgrade_to(row, intent.revision)
        elif intent.action == PHASE:
            row.destination = intent.revision
            self._steps_of(row)
        else:
            self._go_to(row, intent.revision)

    def _go_to(self, row, revision):
        if rollback.is_downgrade(row.stands, revision):
            if not self.intent.allow_downgrade:
                row.refusal = (
                    f"{revision} is below where {row.target.name} stands "
                    f"({row.stands or 'base'}): that is a downgrade, which this request does not "
                    'allow (the HTTP API: add "allow_downgrade": true to the body)'
                )
                return
            row.kind = RunKind.DOWNGRADE
        row.destination = revision
        self._steps_of(row)
        if row.kind == RunKind.DOWNGRADE:
            self._check_reversible(row)

    def _downgrade_to(self, row, revision):
        if not rollback.is_downgrade(row.stands, revision):
            row.left_out = (
                f"it stands at {row.stands or 'base'}, not above {revision}: nothing to take back"
            )
            return
        row.kind = RunKind.DOWNGRADE
        row.destination = revision
        self._steps_of(row)
        self._check_reversible(row)

    def _undo(self, row):
        """Back to ``revision_before`` of the target's last successful upgrade or downgrade,
        only while it still stands at that run's ``revision_after``."""
        target = row.target
        last = self.last_runs.get(target.pk)
        if last is None:
            row.left_out = "no successful upgrade or downgrade to undo"
            return
        before, after = last.revision_before or "", last.revision_after or ""
        failure = self.last_failures.get(target.pk)
        if failure is not None and failure[0] > last.pk:
            # The deploy to undo failed here: its run is the last one, not run #last.pk, and
            # undoing #last.pk instead would take the target further back than anyone asked
            # (to base, after a first migration).
            row.left_out = (
                f"its last run #{failure[0]} {failure[1]}: undo takes back a successful run "
                f"only, and taking back the one before it (#{last.pk}) would go to "
                f"{before or 'base'}. Retry it, or choose a revision to go to (Downgrade to a "
                "revision…, `migrate_tenants --to REVISION`)"
            )
            return
        row.undoes = last
        if _canonical(row.stands) != _canonical(after):
            row.refusal = (
                f"{target.name} no longer stands where run #{last.pk} left it ({after or 'base'}): "
                f"it stands at {row.stands or 'base'} ({row.source}). Undo would not take back "
                "that run; choose a revision to go to instead (Downgrade to a revision…, "
                "`migrate_tenants --to REVISION`)"
            )
            return
        destination = before or "base"
        if "," in destination:
            row.refusal = (
                f"before run #{last.pk} {target.name} stood at several heads ({before}); "
                "Alembic cannot go to several revisions at once: use `--to heads`, a phase, or "
                "one revision"
            )
            return
        row.kind = RunKind.DOWNGRADE if last.kind == RunKind.UPGRADE else RunKind.UPGRADE
        row.destination = destination
        self._steps_of(row)
        if row.kind == RunKind.DOWNGRADE and not row.steps_known:
            error = row.refusal
            self._undo_across_branches(row, last)
            if row.refusal:
                row.refusal = (
                    f"Alembic cannot take {target.name} back from {after or 'base'} to "
                    f"{destination} in one downgrade, nor revert exactly what run #{last.pk} "
                    f"applied: {error}"
                )
        if row.kind == RunKind.DOWNGRADE and row.steps_known:
            self._check_reversible(row)

    def _undo_across_branches(self, row, last):
        """A run on a labelled branch (a contract revision depends on the expand one but
        descends from the revision before both) cannot be reverted by naming where it started:
        Alembic says it is "not a valid downgrade target". Reverting exactly the revisions the
        run applied, relative to where it ended, can."""
        after = last.revision_after or ""
        if not last.applied or "," in after:
            return
        relative = f"{after}@-{len(last.applied)}"
        steps, error = self._alembic_steps(RunKind.DOWNGRADE, row.stands, relative)
        if error or sorted(steps) != sorted(last.applied):
            return
        row.refusal = ""
        row.destination = relative
        row.steps, row.steps_known = steps, True

    def _steps_of(self, row):
        steps, error = self._alembic_steps(row.kind, row.stands, row.destination)
        if error:
            row.refusal = error
            return
        row.steps, row.steps_known = steps, True

    def _alembic_steps(self, kind, stands, destination):
        key = (kind, stands, destination)
        if key not in self._steps:
            try:
                if kind == RunKind.DOWNGRADE:
                    found = rollback.downgrade_steps(stands, destination)
                else:
                    found = _upgrade_steps(stands, destination)
                self._steps[key] = (found, "")
            except MigratorError as exc:
                self._steps[key] = ([], str(exc))
            except Exception as exc:  # noqa: BLE001 - the script directory itself: the row says so
                self._steps[key] = ([], f"Alembic could not plan it ({type(exc).__name__}): {exc}")
        return self._steps[key]

    def _check_reversible(self, row):
        if row.refusal:
            return
        key = (row.stands, row.destination)
        if key not in self._irreversible:
            try:
                found = rollback.irreversible(row.stands, row.destination)
                problem = "; ".join(str(p) for p in found)
                if problem:
                    problem = (
                        f"Cannot downgrade to {row.destination}: {problem}. Write a real "
                        "downgrade() for these revisions, or restore a backup instead"
                    )
            except MigratorError as exc:
                problem = str(exc)
            self._irreversible[key] = problem
        row.refusal = self._irreversible[key]

    # --- the SQL --------------------------------------------------------------------------

    def render(self, row):
        """Alembic's offline rendering of the row's run, or why there is none."""
        try:
            row.sql = runner.sql_preview(
                row.target.provider, row.stands or None, row.destination, kind=row.kind
            ).sql
        except Exception as exc:  # noqa: BLE001 - a revision's own code: any error is the row's
            row.no_sql = _why_no_sql(exc)


def _last_successful_runs(targets):
    """{target id: its last successful upgrade or downgrade} for ``targets``: two queries per
    few hundred targets, whatever the length of their history."""
    from django.db.models import OuterRef, Subquery

    from tenants.models import MigrationTarget

    last = MigrationRun.objects.filter(
        target=OuterRef("pk"),
        kind__in=[RunKind.UPGRADE, RunKind.DOWNGRADE],
        status=RunStatus.SUCCEEDED,
    ).order_by("-finished_at", "-id")
    ids = [target.pk for target in targets]
    found = {}
    for start in range(0, len(ids), 500):
        pairs = (
            MigrationTarget.objects.filter(pk__in=ids[start : start + 500])
            .annotate(last_run=Subquery(last.values("pk")[:1]))
            .values_list("pk", "last_run")
        )
        by_run = {run_id: target_id for target_id, run_id in pairs if run_id}
        for run_id, run in MigrationRun.objects.in_bulk(list(by_run)).items():
            found[by_run[run_id]] = run
    return found


def _last_failed_runs(targets):
    """{target id: (pk, status)} of each target's last failed or interrupted upgrade or
    downgrade: one query per 500 targets."""
    from django.db.models import Max

    ids = [target.pk for target in targets]
    found = {}
    for start in range(0, len(ids), 500):
        rows = (
            MigrationRun.objects.filter(
                target_id__in=ids[start : start + 500],
                kind__in=[RunKind.UPGRADE, RunKind.DOWNGRADE],
                status__in=[RunStatus.FAILED, RunStatus.INTERRUPTED],
            )
            .values("target_id")
            .annotate(last=Max("pk"))
        )
        latest = {row["last"]: row["target_id"] for row in rows}
        for pk, status in MigrationRun.objects.filter(pk__in=list(latest)).values_list(
            "pk", "status"
        ):
            found[latest[pk]] = (pk, status)
    return found


def _upgrade_steps(stands, destination):
    revisions = tuple(r for r in stands.split(",") if r)
    return runner.planned(runner.UPGRADE, revisions, destination)


def _canonical(revision):
    return ",".join(sorted(r for r in (revision or "").split(",") if r))


def _why_no_sql(exc):
    """Why Alembic's offline mode could not render a run's SQL, naming the revision file where
    it stopped; "the run itself is not affected" only where the cause is offline mode's own limit
    (a value it cannot render, SQLite's batch mode), never for what fails online too."""
    first = (str(exc).strip().splitlines() or [""])[0]
    first = re.sub(r"<[^<>]* object at 0x[0-9a-f]+>", "the compiler", first)
    first = re.sub(r" \(Background on this error at: [^)]*\)", "", first)[:300]
    name = type(exc).__name__
    where = _revision_frame(exc)
    at = f" ({where})" if where else ""
    if isinstance(exc, sa_exc.UnsupportedCompilationError):
        return (
            f"No SQL can be shown: a revision{at} uses a type or construct this database "
            f"cannot express: {first}. The run will fail on it too: fix the revision (a type "
            "of this database's dialect, or a generic one such as sa.Integer)."
        )
    if name == "CompileError":
        return (
            f"No SQL can be shown: a revision{at} passes a Python value to a column SQLAlchemy "
            f"cannot render offline (an untyped sa.column()?): {first}. The run itself is not "
            "affected."
        )
    if "batch mode" in first or "--sql mode" in first:
        return (
            "No SQL can be shown: a revision uses batch mode (op.batch_alter_table), which on "
            "SQLite needs a live database to reflect the table. The run itself is not affected."
        )
    if isinstance(exc, MigratorError):
        return f"No SQL can be shown: {first}"
    return (
        f"No SQL can be shown: a revision's code failed offline{at}: {name}: {first}. If that "
        "code reads the database (offline there is none), the run is not affected; otherwise "
        "it will fail the same way when it runs."
    )


def _revision_frame(exc):
    """ "versions/X.py, line N": the last place in the script directory's revisions where
    ``exc`` passed, or ""."""
    versions = Path(settings.TENANT_MIGRATIONS_DIR).resolve() / "versions"
    found = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        path = Path(frame.filename).resolve()
        if versions in path.parents:
            found = f"{path.relative_to(versions.parent)}, line {frame.lineno}"
    return found
