"""The record: which databases exist, which tenants live in them, and every migration attempt.

A ``MigrationTarget`` is a database Alembic runs against. A ``Tenant`` lives in one: a shared-tier
tenant in its region's shared database, a dedicated or external tenant in a target of its own. A
``MigrationRun`` is one attempt against one target. State changes go through ``tenants.actions``.
"""

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import RegexValidator
from django.db import models
from django.db.models import Q

# Lower-case letters, digits, '-' and '_', starting with a letter or digit: safe in a Vault path,
# a URL, a log line and a database name, with no quoting needed anywhere.
SLUG_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}\Z"
slug_validator = RegexValidator(
    SLUG_PATTERN,
    "Use 1 to 63 lower-case letters, digits, '-' or '_', starting with a letter or a digit.",
    code="invalid_slug",
)
vault_path_validator = RegexValidator(
    r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*\Z",
    "A Vault path relative to VAULT_DATABASE_SECRETS_PATH: segments of letters, digits, '.', "
    "'-' or '_', separated by '/'.",
    code="invalid_vault_path",
)

DEFAULT_REGION = "default"


class Strategy(models.TextChoices):
    SHARED = "shared", "Shared"
    DEDICATED = "dedicated", "Dedicated"
    EXTERNAL = "external", "External"


class Provider(models.TextChoices):
    # The providers of ``migrator.providers``, as Django choices: their values and order are in
    # the migrations. tests/test_providers.py checks they name the registered ones.
    POSTGRESQL = "postgresql", "PostgreSQL"
    SQLSERVER = "sqlserver", "SQL Server"
    MYSQL = "mysql", "MySQL / MariaDB"
    SQLITE = "sqlite", "SQLite (local use)"


class TargetStatus(models.TextChoices):
    UNKNOWN = "unknown", "Unknown"
    UP_TO_DATE = "up_to_date", "Up to date"
    BEHIND = "behind", "Behind"
    MIGRATING = "migrating", "Migrating"
    FAILED = "failed", "Failed"
    HELD = "held", "Held"


class BackupPolicy(models.TextChoices):
    INHERIT = "inherit", "Inherit (by kind)"
    ON = "on", "Always"
    OFF = "off", "Never"


class TargetQuerySet(models.QuerySet):
    def active(self):
        """The targets not decommissioned: what the fleet's counts, checks and bulk scopes see."""
        return self.filter(decommissioned_at=None)


class MigrationTarget(models.Model):
    """A database that Alembic runs against, and where it stands."""

    name = models.CharField(
        max_length=63,
        unique=True,
        validators=[slug_validator],
        help_text="Stable name: the tenant id for a dedicated database, e.g. 'shared' otherwise.",
    )
    kind = models.CharField(max_length=16, choices=Strategy.choices)
    provider = models.CharField(
        max_length=16,
        choices=Provider.choices,
        error_messages={
            "invalid_choice": "Unknown provider %(value)s: use one of "
            + ", ".join(Provider.values)
            + "."
        },
    )
    region = models.CharField(max_length=63, default=DEFAULT_REGION, validators=[slug_validator])
    vault_path = models.CharField(
        max_length=255,
        blank=True,
        validators=[vault_path_validator],
        help_text="Path of the credentials under VAULT_DATABASE_SECRETS_PATH. Left empty: "
        "'shared' for a shared database (or 'shared-REGION' outside the default region), "
        "the target's name otherwise.",
    )
    revision = models.CharField(
        max_length=64, blank=True, help_text="Alembic revision the database is at, as last read."
    )
    status = models.CharField(
        max_length=16, choices=TargetStatus.choices, default=TargetStatus.UNKNOWN
    )
    held = models.BooleanField(
        default=False, help_text="A held target is skipped by every migration until released."
    )
    last_error = models.TextField(blank=True)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    last_migrated_at = models.DateTimeField(null=True, blank=True)
    backup_policy = models.CharField(
        max_length=8,
        choices=BackupPolicy.choices,
        default=BackupPolicy.INHERIT,
        help_text="Back up before a run applies anything. 'Inherit' follows the setting for the "
        "target's kind (BACKUP_BEFORE_MIGRATION_*; by default on for external databases only).",
    )
    schema_fingerprint = models.CharField(
        max_length=64, blank=True, help_text="Fingerprint of the schema as last verified."
    )
    drifted = models.BooleanField(
        default=False, help_text="The schema differs from the reference for its revision."
    )
    drift_report = models.TextField(blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    decommissioned_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="A decommissioned (retired) target gets no more runs; its history is kept.",
    )
    canary = models.BooleanField(
        default=False,
        help_text="A canary goes first in a rollout (docs/rollouts.md): the first wave is made of "
        "canaries before any other target.",
    )
    server = models.CharField(
        max_length=255,
        blank=True,
        help_text="host:port of the database server, as last read from the target's secret: "
        "a rollout runs at most ROLLOUT_PER_SERVER_CONCURRENCY migrations at a time on one server.",
    )
    window_days = models.CharField(
        "maintenance window days",
        max_length=64,
        blank=True,
        help_text="Days of a weekly maintenance window, e.g. 'sat,sun' or 'mon-fri' (empty: "
        "any time). A rollout waits for the window instead of migrating outside it.",
    )
    window_start = models.TimeField(
        "maintenance window start", null=True, blank=True, help_text="Local time, e.g. 02:00."
    )
    window_end = models.TimeField(
        "maintenance window end",
        null=True,
        blank=True,
        help_text="Local time; before the start means the window ends the next day.",
    )
    window_timezone = models.CharField(
        "maintenance window time zone",
        max_length=64,
        blank=True,
        help_text="IANA name, e.g. Europe/Paris (empty: UTC).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = TargetQuerySet.as_manager()

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(
                fields=["region"], condition=Q(kind="shared"), name="one_shared_target_per_region"
            ),
        ]
        indexes = [
            models.Index(fields=["status"]),
            models.Index(fields=["region", "provider"]),
        ]

    def __str__(self):
        return self.name

    def save(self, *args, **kwargs):
        if not self.vault_path:
            self.vault_path = self.effective_vault_path
        super().save(*args, **kwargs)

    @property
    def decommissioned(self):
        return self.decommissioned_at is not None

    @property
    def decommissioned_reason(self):
        """Why a retired target gets no run: the planner's refusal and the queue's reason."""
        return (
            f"the target is decommissioned (since {self.decommissioned_at:%Y-%m-%d %H:%M} UTC): "
            "it gets no more runs; its history is kept"
        )

    def default_vault_path(self):
        if self.kind == Strategy.SHARED:
            return "shared" if self.region == DEFAULT_REGION else f"shared-{self.region}"
        return self.name

    def clean(self):
        if not self.vault_path:
            self.vault_path = self.effective_vault_path
        self.clean_window()

    def clean_window(self):
        """A maintenance window a rollout can read, or a ValidationError saying what is wrong."""
        from tenants.rollouts import window_days, window_zone

        errors = {}
        try:
            window_days(self.window_days)
        except ValueError as exc:
            errors["window_days"] = str(exc)
        try:
            window_zone(self)
        except ValueError as exc:
            errors["window_timezone"] = str(exc)
        if errors:
            raise ValidationError(errors)

    @property
    def effective_vault_path(self):
        """The path under VAULT_DATABASE_SECRETS_PATH the credentials are read from: the
        ``vault_path`` field, or when it is blank the default for the target's kind and region.

        The one definition every reader uses (runs, ``vault_check``, verification, backups,
        restores): a blank field can reach the database without ``save()`` (``loaddata``,
        ``bulk_create``, ``QuerySet.update``), and must mean the same path everywhere.
        """
        return self.vault_path or self.default_vault_path()

    @property
    def full_vault_path(self):
        """The KV v2 path the credentials are read from, e.g. ``secret/data/database/shared``."""
        return (
            f"{settings.VAULT_MOUNT_POINT}/data/"
            f"{settings.VAULT_DATABASE_SECRETS_PATH}/{self.effective_vault_path}"
        )


class Tenant(models.Model):
    """A customer of the SaaS and the database it lives in."""

    id = models.CharField("tenant id", max_length=63, primary_key=True, validators=[slug_validator])
    name = models.CharField(max_length=200)
    strategy = models.CharField(max_length=16, choices=Strategy.choices, default=Strategy.SHARED)
    region = models.CharField(max_length=63, default=DEFAULT_REGION, validators=[slug_validator])
    target = models.ForeignKey(
        MigrationTarget,
        on_delete=models.PROTECT,
        related_name="tenants",
        null=True,
        blank=True,
        help_text="The database this tenant lives in. Left empty for a shared-tier tenant: "
        "its region's shared database.",
    )
    auto_migrate = models.BooleanField(
        default=True,
        help_text="Migrate the tenant's own database as soon as the tenant is created.",
    )
    decommissioned_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="A decommissioned tenant is retired: its own database gets no more runs; its "
        "history is kept.",
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["strategy", "region"])]
        permissions = [("register_tenants", "Can register tenants")]

    def __str__(self):
        return self.id

    @property
    def decommissioned(self):
        return self.decommissioned_at is not None

    def clean(self):
        if self.strategy == Strategy.SHARED and self.target_id is None:
            self.target = MigrationTarget.objects.filter(
                kind=Strategy.SHARED, region=self.region
            ).first()
            if self.target is None:
                raise ValidationError(
                    {
                        "target": f"There is no shared database in region {self.region!r}: "
                        "create a migration target of kind 'shared' in that region first."
                    }
                )
        if self.target is None:
            raise ValidationError(
                {
                    "target": f"A {self.get_strategy_display().lower()} tenant needs a migration "
                    f"target of its own (kind '{self.strategy}'): create it, then choose it here."
                }
            )
        errors = {}
        if self.target.kind != self.strategy:
            errors["target"] = (
                f"{self.target.name} is a {self.target.get_kind_display().lower()} database; a "
                f"{self.get_strategy_display().lower()} tenant needs a target of kind "
                f"'{self.strategy}'."
            )
        elif self.target.region != self.region:
            errors["region"] = (
                f"The tenant is in region {self.region!r} but its database {self.target.name} "
                f"is in region {self.target.region!r}."
            )
        elif self.strategy != Strategy.SHARED:
            owner = Tenant.objects.filter(target_id=self.target_id).exclude(pk=self.pk).first()
            if owner is not None:
                errors["target"] = (
                    f"{self.target.name} already belongs to tenant {owner.id}; a "
                    f"{self.get_strategy_display().lower()} tenant needs a database of its own."
                )
        if errors:
            raise ValidationError(errors)


class RunKind(models.TextChoices):
    UPGRADE = "upgrade", "Upgrade"
    DOWNGRADE = "downgrade", "Downgrade"
    RESTORE = "restore", "Restore a backup"
    VERIFY = "verify", "Verify the schema"


class Trigger(models.TextChoices):
    ADMIN = "admin", "Admin"
    COMMAND = "command", "Management command"
    SIGNAL = "signal", "Tenant created"
    API = "api", "HTTP API"
    STARTUP = "startup", "Startup"
    SCHEDULE = "schedule", "Schedule"


class RunStatus(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    SKIPPED = "skipped", "Skipped"
    INTERRUPTED = "interrupted", "Interrupted"


ACTIVE_RUN_STATUSES = (RunStatus.QUEUED, RunStatus.RUNNING)
# Errors a run ends with before it could read where its database stood.
NOT_READ_ERROR_CODES = frozenset(
    {
        "vault_error",
        "vault_unavailable",
        "vault_auth_failed",
        "vault_forbidden",
        "secret_not_found",
        "vault_mount_not_kv2",
        "secret_incomplete",
        "unknown_provider",
        "database_unreachable",
        "database_not_found",
        "database_auth_failed",
        "locked",
        "queue_unavailable",
        "cancelled",
    }
)
# A run queued this long without a worker taking it is worth a warning (the fleet dashboard,
# `migrate_tenants --wait`); RUN_QUEUED_TIMEOUT_SECONDS later, in a queue that stands still, it
# is closed as abandoned.
QUEUED_WARNING_SECONDS = 60
FINISHED_RUN_STATUSES = (
    RunStatus.SUCCEEDED,
    RunStatus.FAILED,
    RunStatus.CANCELLED,
    RunStatus.SKIPPED,
    RunStatus.INTERRUPTED,
)


class MigrationRun(models.Model):
    """One attempt to bring one target to a revision, and its outcome."""

    target = models.ForeignKey(MigrationTarget, on_delete=models.CASCADE, related_name="runs")
    kind = models.CharField(max_length=16, choices=RunKind.choices, default=RunKind.UPGRADE)
    trigger = models.CharField(max_length=16, choices=Trigger.choices)
    triggered_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
    )
    batch = models.UUIDField(
        null=True, blank=True, db_index=True, help_text="Runs started together share a batch."
    )
    requested_revision = models.CharField(max_length=64, default="head")
    status = models.CharField(max_length=16, choices=RunStatus.choices, default=RunStatus.QUEUED)
    revision_before = models.CharField(max_length=64, blank=True)
    revision_after = models.CharField(max_length=64, blank=True)
    applied = models.JSONField(default=list, blank=True, help_text="Revisions applied, in order.")
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    error_code = models.CharField(max_length=32, blank=True)
    retryable = models.BooleanField(null=True, blank=True)
    log = models.TextField(blank=True)
    phase = models.CharField(
        max_length=16, blank=True, help_text="expand or contract, for a blue/green phase run."
    )
    backup_path = models.CharField(max_length=500, blank=True)
    backup_size = models.BigIntegerField(null=True, blank=True)
    backup_checksum = models.CharField(max_length=80, blank=True, help_text="sha256")
    backup_duration_ms = models.PositiveIntegerField(null=True, blank=True)
    restored_from = models.ForeignKey(
        "self",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="For a restore: the run whose backup was restored.",
    )
    drift_report = models.TextField(blank=True)
    admin_credentials = models.CharField(
        max_length=16,
        blank=True,
        help_text="Where the run's admin user came from: static (the KV secret), dynamic (made "
        "by Vault for this run) or static-role (a password Vault rotates).",
    )
    credentials_user = models.CharField(max_length=128, blank=True)
    credentials_lease = models.CharField(
        max_length=300,
        blank=True,
        help_text="Dynamic credentials: the lease's path and the last characters of its id.",
    )
    credentials_revoked = models.BooleanField(
        null=True,
        blank=True,
        help_text="Dynamic credentials: was the lease revoked after the run (empty: not yet).",
    )
    worker_cluster = models.CharField(max_length=100, blank=True)
    attempt = models.PositiveSmallIntegerField(
        default=1, help_text="1 for a first try; automatic retries of retryable errors count up."
    )
    not_before = models.DateTimeField(
        null=True, blank=True, help_text="A retry waits until then (back-off)."
    )
    task_id = models.CharField(max_length=64, blank=True)
    worker_host = models.CharField(max_length=255, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    rollout = models.ForeignKey(
        "Rollout",
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="runs",
        help_text="The rollout that queued this run (docs/rollouts.md).",
    )

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["target"],
                condition=Q(status__in=["queued", "running"]),
                name="one_active_run_per_target",
                violation_error_message="This target already has a queued or running migration.",
            ),
        ]
        indexes = [
            models.Index(fields=["status", "created_at"]),
            models.Index(fields=["target", "-created_at"]),
        ]
        permissions = [("run_migrations", "Can run tenant migrations")]

    def __str__(self):
        return f"run #{self.pk}"

    @property
    def is_active(self):
        return self.status in ACTIVE_RUN_STATUSES

    @property
    def stood_at(self):
        """Where the database stood before the run: its revision, ``base`` for one read as
        empty, ``?`` when the run ended before it could read it (its error says why)."""
        if self.revision_before:
            return self.revision_before
        return "?" if self.error_code in NOT_READ_ERROR_CODES else "base"

    @property
    def ended_at_revision(self):
        """Where the database stood after the run: its revision, ``base`` when a run that
        finished knowing it left it empty (an undo or downgrade to base, a failure on the first
        revision), ``?`` when the run ended before it could read it or was stopped."""
        if self.revision_after:
            return self.revision_after
        if self.status in (RunStatus.SUCCEEDED, RunStatus.SKIPPED):
            return "base"
        if self.status == RunStatus.FAILED and self.error_code not in NOT_READ_ERROR_CODES:
            return "base"
        return "?"

    @property
    def error_summary(self):
        """The error's first line, for lists; ``error`` keeps the whole message (PostgreSQL's
        DETAIL, the rows a revision's own message lists)."""
        return self.error.split("\n", 1)[0]

    @property
    def reason(self):
        """Why the run changed nothing, in words: skipped (already there), or the first line
        of the error of a run that failed, was cancelled or interrupted; "" otherwise."""
        if self.status == RunStatus.SKIPPED:
            return (
                f"nothing to apply: the database already stood at "
                f"{self.revision_after or 'base'} ({self.kind} to {self.requested_revision})"
            )
        if self.error:
            return self.error_summary
        return ""

    def outcome(self):
        """The run as plain data, as the API and ``migrate_tenants --json`` show it."""
        return {
            "run": self.pk,
            "target": self.target.name,
            "provider": self.target.provider,
            "region": self.target.region,
            "kind": self.kind,
            "phase": self.phase or None,
            "trigger": self.trigger,
            "status": self.status,
            "requested_revision": self.requested_revision,
            "revision_before": self.revision_before or None,
            "revision_after": self.revision_after or None,
            "applied": self.applied,
            "duration_ms": self.duration_ms,
            "error": self.error or None,
            "error_summary": self.error_summary or None,
            "reason": self.reason or None,
            "error_code": self.error_code or None,
            "retryable": self.retryable,
            "attempt": self.attempt,
            "worker_cluster": self.worker_cluster or None,
            "drift_report": self.drift_report or None,
            # Where the admin user came from (empty: the KV secret's own pair), and for a user
            # Vault made for the run, whether its lease was revoked (None: not yet).
            "admin_credentials": self.admin_credentials or None,
            "credentials_user": self.credentials_user or None,
            "credentials_lease": self.credentials_lease or None,
            "credentials_revoked": self.credentials_revoked,
        }


class RolloutStatus(models.TextChoices):
    PLANNED = "planned", "Planned"
    RUNNING = "running", "Running"
    BAKING = "baking", "Baking"
    HALTED = "halted", "Halted"
    COMPLETED = "completed", "Completed"
    ABORTED = "aborted", "Aborted"


ACTIVE_ROLLOUT_STATUSES = (RolloutStatus.PLANNED, RolloutStatus.RUNNING, RolloutStatus.BAKING)
FINISHED_ROLLOUT_STATUSES = (RolloutStatus.COMPLETED, RolloutStatus.ABORTED)


class Rollout(models.Model):
    """A recorded, resumable plan that takes a selection of targets to a revision in waves,
    halting when its failure budget is spent (docs/rollouts.md). ``tenants.rollouts`` moves it."""

    revision = models.CharField(max_length=64, default="head")
    heads = models.JSONField(
        default=list,
        blank=True,
        help_text="The script directory's head(s) when a rollout to head started: a wave is "
        "never sent to heads no canary ran (the rollout halts instead).",
    )
    selection = models.JSONField(
        default=dict, blank=True, help_text="What was selected, as it was asked."
    )
    waves_spec = models.CharField(
        max_length=200, help_text="As given: counts or cumulative percentages, e.g. 1,10%,50%,100%"
    )
    waves = models.JSONField(
        default=list, help_text="The targets of each wave, in order: lists of target ids."
    )
    max_failures = models.PositiveIntegerField(
        null=True, blank=True, help_text="Halt when more targets than this fail (0: the first)."
    )
    max_failure_rate = models.FloatField(
        null=True,
        blank=True,
        help_text="Halt when more than this percentage of the targets sent so far failed.",
    )
    bake_seconds = models.PositiveIntegerField(
        default=0, help_text="How long each finished wave is watched before the next starts."
    )
    per_server_concurrency = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="At most this many migrations at a time on one database server "
        "(empty: ROLLOUT_PER_SERVER_CONCURRENCY).",
    )
    status = models.CharField(
        max_length=16, choices=RolloutStatus.choices, default=RolloutStatus.PLANNED
    )
    current_wave = models.PositiveIntegerField(default=0, help_text="0-based index in waves.")
    bake_until = models.DateTimeField(null=True, blank=True)
    # Runs up to this id that failed were before the last resume: their targets go again, and
    # their failures no longer count against the budget.
    resumed_after_run = models.PositiveBigIntegerField(default=0)
    note = models.TextField(blank=True, help_text="Why it halted, and what to do.")
    # Targets that got no run when their wave started: {target id: {"state", "reason"}}, state
    # "skipped" (held, decommissioned) or "refused" (the planner refused it: counts as a failure).
    notes = models.JSONField(default=dict, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    trigger = models.CharField(max_length=16, choices=Trigger.choices, default=Trigger.COMMAND)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status"])]

    def __str__(self):
        return f"rollout #{self.pk}"

    @property
    def is_active(self):
        return self.status in ACTIVE_ROLLOUT_STATUSES

    @property
    def target_ids(self):
        return [target_id for wave in self.waves for target_id in wave]
