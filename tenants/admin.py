"""Django admin for tenants, migration targets and runs.

Runs are read-only: they are the audit trail, written only by ``tenants.actions``. The actions
that start migrations are shown only to users with the ``tenants.run_migrations`` permission,
which is separate from the permission to edit tenants.
"""

from django.contrib import admin, messages
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from tenants import actions
from tenants.models import (
    MigrationRun,
    MigrationTarget,
    RunKind,
    RunStatus,
    TargetStatus,
    Tenant,
    Trigger,
)

RECENT_RUNS_ON_TARGET_PAGE = 20


def _drift_report_html(report):
    """A drift report (``migrator.verify``) as preformatted text; "-" before any verification."""
    if not report:
        return "-"
    return format_html('<pre style="white-space: pre-wrap">{}</pre>', report)


def dispatch_level(dispatch):
    """How a trigger's message shows: an error when the queue refused the new run."""
    if dispatch.unqueued:
        return messages.ERROR
    return messages.SUCCESS if dispatch.created else messages.WARNING


def _run_link(run):
    return format_html(
        '<a href="{}">#{}</a>', reverse("admin:tenants_migrationrun_change", args=[run.pk]), run.pk
    )


class RunMigrationsActions:
    """Admin actions that start migrations; shown only with ``tenants.run_migrations``.

    Thin loops in django-allauth's manner: call the action, report each row with
    ``message_user``. Subclasses say how the selected rows map to targets.
    """

    actions = [
        "migrate_to_head",
        "retry_failed",
        "preview_sql",
        "downgrade_to_revision",
        "undo_last_run",
        "run_expand_phase",
        "run_contract_phase",
    ]
    MESSAGES_PER_ROW_LIMIT = 25

    def has_run_migrations_permission(self, request):
        return request.user.has_perm("tenants.run_migrations")

    def targets_of(self, queryset):
        raise NotImplementedError

    def _dispatch(self, request, targets):
        dispatches = actions.do_enqueue_runs(
            targets, trigger=Trigger.ADMIN, acting_user=request.user
        )
        for dispatch in dispatches[: self.MESSAGES_PER_ROW_LIMIT]:
            level = dispatch_level(dispatch)
            if dispatch.run is None:
                level = messages.ERROR
            self.message_user(request, dispatch.message, level)
        rest = dispatches[self.MESSAGES_PER_ROW_LIMIT :]
        if rest:
            created = sum(d.created for d in rest)
            self.message_user(
                request,
                f"... and {len(rest)} more target(s): {created} queued, "
                f"{len(rest) - created} already under way or held.",
                messages.INFO,
            )

    @admin.action(description="Migrate to head", permissions=["run_migrations"])
    def migrate_to_head(self, request, queryset):
        self._dispatch(request, self.targets_of(queryset))

    @admin.action(description="Retry failed migrations", permissions=["run_migrations"])
    def retry_failed(self, request, queryset):
        targets = [t for t in self.targets_of(queryset) if t.status == TargetStatus.FAILED]
        if not targets:
            self.message_user(request, "None of the selected targets has failed.", messages.INFO)
            return
        self._dispatch(request, targets)

    @admin.action(description="Preview the SQL (dry run)", permissions=["run_migrations"])
    def preview_sql(self, request, queryset):
        from migrator import runner
        from migrator.exceptions import MigratorError

        groups = {}
        for target in self.targets_of(queryset):
            groups.setdefault((target.provider, target.revision or None), []).append(target)
        previews = []
        for (provider, revision), targets in sorted(
            groups.items(), key=lambda item: (item[0][0], item[0][1] or "")
        ):
            try:
                sql = runner.sql_preview(provider, revision, "head").sql
                error = ""
            except MigratorError as exc:
                sql, error = "", str(exc)
            previews.append(
                {
                    "provider": provider,
                    "revision": revision,
                    "targets": targets,
                    "sql": sql,
                    "error": error,
                }
            )
        context = {
            **self.admin_site.each_context(request),
            "title": "Preview the SQL of a migration to head",
            "previews": previews,
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/tenants/preview_sql.html", context)

    # --- rollback -----------------------------------------------------------------------------

    @admin.action(description="Downgrade to a revision…", permissions=["run_migrations"])
    def downgrade_to_revision(self, request, queryset):
        from migrator import rollback

        targets = self.targets_of(queryset)
        revision = request.POST.get("revision", "")
        rows = []
        if revision:
            for target in targets:
                if rollback.is_downgrade(target.revision, revision):
                    rows.append((target, revision))
                else:
                    self.message_user(
                        request,
                        f"{target.name} is at {target.revision or 'base'}, not above {revision}: "
                        "left alone.",
                        messages.WARNING,
                    )
        return self._downgrade(
            request,
            rows,
            action="downgrade_to_revision",
            title="Downgrade to a revision",
            choose_revision=True,
        )

    @admin.action(description="Undo the last run", permissions=["run_migrations"])
    def undo_last_run(self, request, queryset):
        rows = []
        for target in self.targets_of(queryset):
            last = (
                target.runs.filter(kind=RunKind.UPGRADE, status=RunStatus.SUCCEEDED)
                .order_by("-finished_at", "-id")
                .first()
            )
            if last is None:
                self.message_user(
                    request, f"{target.name} has no successful run to undo.", messages.WARNING
                )
            else:
                rows.append((target, last.revision_before or "base"))
        return self._downgrade(request, rows, action="undo_last_run", title="Undo the last run")

    def _downgrade(self, request, rows, *, action, title, choose_revision=False):
        """The confirmation page of a downgrade (each target, where it is, where it goes, the SQL
        it will run, and whatever makes it impossible); on confirmation, the runs."""
        from migrator import rollback, runner
        from migrator.exceptions import MigratorError

        plans = []
        for target, destination in rows:
            problems, sql = [], ""
            try:
                problems = [str(p) for p in rollback.irreversible(target.revision, destination)]
                sql = runner.sql_preview(
                    target.provider, target.revision or None, destination, kind="downgrade"
                ).sql
            except MigratorError as exc:
                problems.append(str(exc))
            plans.append(
                {"target": target, "destination": destination, "sql": sql, "problems": problems}
            )
        blocked = [plan for plan in plans if plan["problems"]]
        if request.POST.get("confirm") == "yes" and plans and not blocked:
            by_destination = {}
            for plan in plans:
                by_destination.setdefault(plan["destination"], []).append(plan["target"])
            for destination, targets in by_destination.items():
                for dispatch in actions.do_enqueue_runs(
                    targets,
                    trigger=Trigger.ADMIN,
                    acting_user=request.user,
                    revision=destination,
                    kind=RunKind.DOWNGRADE,
                ):
                    level = dispatch_level(dispatch)
                    self.message_user(request, f"Downgrade: {dispatch.message}", level)
            return None
        revisions = []
        if choose_revision:
            script = runner.script_directory()
            revisions = ["base"] + [r.revision for r in script.walk_revisions()]
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "action": action,
            "selected": request.POST.getlist(admin.helpers.ACTION_CHECKBOX_NAME),
            "revisions": revisions,
            "revision": request.POST.get("revision", ""),
            "plans": plans,
            "blocked": blocked,
        }
        return TemplateResponse(request, "admin/tenants/downgrade_confirm.html", context)

    # --- blue/green -----------------------------------------------------------------------------

    @admin.action(description="Run the expand phase", permissions=["run_migrations"])
    def run_expand_phase(self, request, queryset):
        self._phase(request, queryset, "expand")

    @admin.action(description="Run the contract phase", permissions=["run_migrations"])
    def run_contract_phase(self, request, queryset):
        self._phase(request, queryset, "contract")

    def _phase(self, request, queryset, phase):
        from migrator import phases

        if not phases.has_phases():
            self.message_user(
                request, "The script directory has no expand/contract branches.", messages.ERROR
            )
            return
        targets = self.targets_of(queryset)
        if phase == phases.CONTRACT:
            lagging = phases.lagging_on_expand(targets)
            if lagging:
                self.message_user(
                    request,
                    f"Contract refused: {len(lagging)} target(s) have not finished expand: "
                    + ", ".join(t.name for t in lagging[:50]),
                    messages.ERROR,
                )
                return
        dispatches = actions.do_enqueue_runs(
            targets,
            trigger=Trigger.ADMIN,
            acting_user=request.user,
            revision=phases.destination(phase),
            phase=phase,
        )
        for dispatch in dispatches[: self.MESSAGES_PER_ROW_LIMIT]:
            level = dispatch_level(dispatch)
            self.message_user(request, f"{phase.title()}: {dispatch.message}", level)


@admin.register(MigrationTarget)
class MigrationTargetAdmin(RunMigrationsActions, admin.ModelAdmin):
    list_display = (
        "name",
        "kind",
        "provider",
        "region",
        "revision",
        "status",
        "phase",
        "held",
        "drifted",
        "last_migrated_at",
    )
    list_filter = ("kind", "provider", "region", "status", "drifted", "held", "revision")
    search_fields = ("name", "vault_path", "tenants__id")
    readonly_fields = (
        "revision",
        "status",
        "last_error",
        "last_checked_at",
        "last_migrated_at",
        "created_at",
        "updated_at",
        "recent_runs",
        "drifted",
        "schema_fingerprint",
        "verified_at",
        "drift_report_text",
    )
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "name",
                    "kind",
                    "provider",
                    "region",
                    "vault_path",
                    "held",
                    "backup_policy",
                )
            },
        ),
        (
            "Where it stands",
            {
                "fields": (
                    "revision",
                    "status",
                    "last_error",
                    "last_checked_at",
                    "last_migrated_at",
                    "created_at",
                    "updated_at",
                )
            },
        ),
        (
            "Schema verification",
            {"fields": ("drifted", "schema_fingerprint", "verified_at", "drift_report_text")},
        ),
        ("Run history", {"fields": ("recent_runs",)}),
    )
    show_full_result_count = False

    @admin.display(description="drift report")
    def drift_report_text(self, obj):
        return _drift_report_html(obj.drift_report)

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        if "held" in form.changed_data or (obj.held and not change):
            # Holding or releasing sets the status too: the dashboard and /readyz count it.
            actions.do_set_held(obj, held=obj.held, acting_user=request.user)

    def targets_of(self, queryset):
        return list(queryset)

    @admin.display(description="blue/green")
    def phase(self, obj):
        from migrator import phases

        if not phases.has_phases():
            return "-"
        return phases.state(obj.revision).label

    @admin.display(description=f"Latest {RECENT_RUNS_ON_TARGET_PAGE} runs")
    def recent_runs(self, obj):
        if obj.pk is None:
            return "-"
        runs = obj.runs.select_related("triggered_by")[:RECENT_RUNS_ON_TARGET_PAGE]
        if not runs:
            return "No runs yet."
        rows = format_html_join(
            "\n",
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} → {}</td>"
            "<td>{}</td><td>{}</td></tr>",
            (
                (
                    _run_link(run),
                    run.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    run.get_kind_display(),
                    run.get_status_display(),
                    run.revision_before or "base",
                    run.revision_after or "-",
                    run.get_trigger_display(),
                    run.error.splitlines()[0] if run.error else "",
                )
                for run in runs
            ),
        )
        return format_html(
            "<table><thead><tr><th>Run</th><th>Created</th><th>Kind</th><th>Status</th>"
            "<th>Revision</th><th>Trigger</th><th>Error</th></tr></thead><tbody>{}</tbody>"
            "</table>",
            rows,
        )


@admin.register(Tenant)
class TenantAdmin(RunMigrationsActions, admin.ModelAdmin):
    list_display = (
        "id",
        "name",
        "strategy",
        "provider",
        "region",
        "target",
        "revision",
        "target_status",
        "auto_migrate",
    )
    list_filter = ("strategy", "region", "target__provider", "target__status", "auto_migrate")
    search_fields = ("id", "name", "target__name")
    list_select_related = ("target",)
    autocomplete_fields = ("target",)
    show_full_result_count = False

    def targets_of(self, queryset):
        ids = queryset.exclude(target=None).values_list("target_id", flat=True).distinct()
        return list(MigrationTarget.objects.filter(pk__in=ids).order_by("name"))

    def get_readonly_fields(self, request, obj=None):
        # The tenant id names its Vault path and its database: it never changes once created.
        return ("id", "created_at") if obj else ("created_at",)

    @admin.display(description="provider", ordering="target__provider")
    def provider(self, obj):
        return obj.target.get_provider_display() if obj.target else "-"

    @admin.display(description="revision", ordering="target__revision")
    def revision(self, obj):
        return obj.target.revision if obj.target else "-"

    @admin.display(description="status", ordering="target__status")
    def target_status(self, obj):
        return obj.target.get_status_display() if obj.target else "-"


@admin.register(MigrationRun)
class MigrationRunAdmin(admin.ModelAdmin):
    list_display = (
        "id",
        "target",
        "kind",
        "status",
        "trigger",
        "requested_revision",
        "revision_before",
        "revision_after",
        "duration_ms",
        "triggered_by",
        "created_at",
    )
    list_filter = ("status", "kind", "trigger", "target__provider", "target__region")
    search_fields = ("target__name", "task_id", "error")
    list_select_related = ("target", "triggered_by")
    date_hierarchy = "created_at"
    show_full_result_count = False
    fieldsets = (
        (
            None,
            {
                "fields": (
                    "target",
                    "kind",
                    "status",
                    "trigger",
                    "triggered_by",
                    "batch",
                    "requested_revision",
                )
            },
        ),
        (
            "Outcome",
            {
                "fields": (
                    "revision_before",
                    "revision_after",
                    "applied",
                    "duration_ms",
                    "error_code",
                    "retryable",
                    "error",
                )
            },
        ),
        (
            "Backup",
            {
                "fields": (
                    "backup_path",
                    "backup_size",
                    "backup_checksum",
                    "backup_duration_ms",
                    "restored_from",
                )
            },
        ),
        ("Log", {"fields": ("log_lines",)}),
        ("Schema verification", {"fields": ("drift_report_text",)}),
        (
            "Execution",
            {
                "fields": (
                    "attempt",
                    "not_before",
                    "task_id",
                    "worker_host",
                    "created_at",
                    "started_at",
                    "heartbeat_at",
                    "finished_at",
                )
            },
        ),
    )

    def get_readonly_fields(self, request, obj=None):
        return [f for fs in self.fieldsets for f in fs[1]["fields"]]

    @admin.display(description="log")
    def log_lines(self, obj):
        if not obj.log:
            return "-"
        return format_html('<pre style="white-space: pre-wrap">{}</pre>', obj.log)

    @admin.display(description="drift report")
    def drift_report_text(self, obj):
        return _drift_report_html(obj.drift_report)

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
