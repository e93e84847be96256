"""Django admin for tenants, migration targets and runs.

Runs are read-only: they are the audit trail, written only by ``tenants.actions``. The actions
that start migrations are shown only to users with the ``tenants.run_migrations`` permission,
which is separate from the permission to edit tenants.
"""

import textwrap

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import ValidationError
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from migrator.exceptions import ScriptDirectoryUnreadable
from tenants import actions, planning
from tenants.models import (
    DEFAULT_REGION,
    MigrationRun,
    MigrationTarget,
    Provider,
    Rollout,
    Strategy,
    TargetStatus,
    Tenant,
    Trigger,
    vault_path_validator,
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


def report_cancelled(model_admin, request, cancelled, running):
    """Say which runs were cancelled, and which were running and could not be."""
    for run in cancelled:
        model_admin.message_user(
            request,
            f"Run #{run.pk} for {run.target.name} cancelled; nothing ran.",
            messages.SUCCESS,
        )
    for run in running:
        model_admin.message_user(
            request,
            f"Run #{run.pk} for {run.target.name} is running and cannot be cancelled: it holds "
            "the target's lock and ends by itself.",
            messages.WARNING,
        )
    if not cancelled and not running:
        model_admin.message_user(request, "None of the selected has a queued run.", messages.INFO)


class DecommissionAction:
    """The admin action that retires tenants or targets (``tenants.actions``): shown only with
    ``tenants.register_tenants``; one message per row."""

    def has_register_tenants_permission(self, request):
        return request.user.has_perm("tenants.register_tenants")

    def decommission_one(self, obj, request):
        raise NotImplementedError

    @admin.action(
        description="Decommission (no more runs, history kept)", permissions=["register_tenants"]
    )
    def decommission(self, request, queryset):
        for obj in queryset:
            what = f"{obj._meta.verbose_name} {obj}"
            outcome = self.decommission_one(obj, request)
            if outcome.done:
                cancelled = "".join(f"; run #{run.pk} cancelled" for run in outcome.cancelled)
                self.message_user(
                    request,
                    f"{what} decommissioned: it gets no more runs{cancelled}.",
                    messages.SUCCESS,
                )
            else:
                self.message_user(
                    request, f"{what} not decommissioned: {outcome.refusal}", messages.ERROR
                )


class WideChangelist:
    """A changelist without the navigation sidebar: its columns need the width more than a menu
    of six models (the breadcrumbs and the index lead to them)."""

    def changelist_view(self, request, extra_context=None):
        from tenants.actions import reconcile_with_current_heads

        reconcile_with_current_heads()  # statuses shown agree with the revisions now on disk
        extra_context = {"is_nav_sidebar_enabled": False, **(extra_context or {})}
        return super().changelist_view(request, extra_context)


def _short_time(moment):
    """``2026-12-02 10:15`` in the current time zone: narrower than Django's default format."""
    from django.utils import timezone

    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M") if moment else "–"


def _run_link(run):
    return format_html(
        '<a href="{}">#{}</a>', reverse("admin:tenants_migrationrun_change", args=[run.pk]), run.pk
    )


class RunMigrationsActions:
    """Admin actions that start migrations; shown only with ``tenants.run_migrations``.

    Thin loops in django-allauth's manner: ask the planner (``tenants.planning``) for one row
    per target, show the rows (a confirmation page, or a message per row), hand the accepted
    ones to ``actions.do_enqueue_plan``. Subclasses say how the selected rows map to targets.
    """

    actions = [
        "migrate_to_head",
        "retry_failed",
        "preview_sql",
        "downgrade_to_revision",
        "undo_last_run",
        "run_expand_phase",
        "run_contract_phase",
        "cancel_queued_runs",
    ]
    MESSAGES_PER_ROW_LIMIT = 25

    def has_run_migrations_permission(self, request):
        return request.user.has_perm("tenants.run_migrations")

    def targets_of(self, queryset):
        raise NotImplementedError

    def _queue(self, request, rows, prefix=""):
        """Say why each row not queued was not, queue the others, report each run."""
        by_reason = {}
        for row in rows:
            if not row.accepted:
                level = messages.ERROR if row.refusal else messages.WARNING
                by_reason.setdefault((row.reason, level), []).append(row.target.name)
        for (reason, level), names in by_reason.items():
            shown = ", ".join(names[:50]) + (", …" if len(names) > 50 else "")
            self.message_user(request, f"{prefix}Not queued for {shown}: {reason}.", level)
        dispatches = actions.do_enqueue_plan(rows, trigger=Trigger.ADMIN, acting_user=request.user)
        for dispatch in dispatches[: self.MESSAGES_PER_ROW_LIMIT]:
            level = dispatch_level(dispatch)
            if not dispatch.carried_out:
                level = messages.ERROR
            self.message_user(request, prefix + dispatch.message, level)
        rest = dispatches[self.MESSAGES_PER_ROW_LIMIT :]
        if rest:
            created = sum(d.created for d in rest)
            self.message_user(
                request,
                f"... and {len(rest)} more target(s): {created} queued, "
                f"{len(rest) - created} already under way or held.",
                messages.INFO,
            )

    @admin.action(description="Cancel queued runs", permissions=["run_migrations"])
    def cancel_queued_runs(self, request, queryset):
        cancelled, running = actions.do_cancel_queued_runs(
            self.targets_of(queryset), acting_user=request.user
        )
        report_cancelled(self, request, cancelled, running)

    @admin.action(description="Migrate to head", permissions=["run_migrations"])
    def migrate_to_head(self, request, queryset):
        rows = planning.plan(self.targets_of(queryset), planning.Intent.upgrade())
        self._queue(request, rows)

    @admin.action(description="Retry failed migrations", permissions=["run_migrations"])
    def retry_failed(self, request, queryset):
        targets = [t for t in self.targets_of(queryset) if t.status == TargetStatus.FAILED]
        if not targets:
            self.message_user(request, "None of the selected targets has failed.", messages.INFO)
            return
        self._queue(request, planning.plan(targets, planning.Intent.upgrade()))

    @admin.action(description="Preview the SQL (dry run)", permissions=["run_migrations"])
    def preview_sql(self, request, queryset):
        rows = planning.plan(
            self.targets_of(queryset), planning.Intent.upgrade(), live=True, sql=True
        )
        groups = {}
        for row in rows:
            key = (
                row.target.provider,
                row.stands,
                row.source,
                row.goes_to,
                row.sql,
                row.no_sql,
                row.reason,
                row.source_note,
                row.status,
            )
            groups.setdefault(key, []).append(row)
        context = {
            **self.admin_site.each_context(request),
            "title": "Preview the SQL of a migration to head",
            "groups": [
                {"row": group[0], "targets": [row.target for row in group]}
                for group in groups.values()
            ],
            "opts": self.model._meta,
        }
        return TemplateResponse(request, "admin/tenants/preview_sql.html", context)

    # --- rollback -----------------------------------------------------------------------------

    @admin.action(description="Downgrade to a revision…", permissions=["run_migrations"])
    def downgrade_to_revision(self, request, queryset):
        targets = self.targets_of(queryset)
        try:
            choices = planning.downgrade_choices(targets)
        except ScriptDirectoryUnreadable as exc:
            self.message_user(request, str(exc), messages.ERROR)
            return None
        revision = request.POST.get("revision", "") or (choices[0] if choices else "")
        rows = []
        if revision and revision not in choices:
            self.message_user(
                request,
                f"{revision} is not a revision every selected target can be downgraded to; "
                "choose one in the list.",
                messages.ERROR,
            )
            revision = ""
        elif revision:
            rows = planning.plan(targets, planning.Intent.downgrade(revision), live=True, sql=True)
        return self._confirm(
            request,
            rows,
            action="downgrade_to_revision",
            title="Downgrade to a revision",
            choices=choices,
            revision=revision,
        )

    @admin.action(description="Undo the last run", permissions=["run_migrations"])
    def undo_last_run(self, request, queryset):
        rows = planning.plan(self.targets_of(queryset), planning.Intent.undo(), live=True, sql=True)
        return self._confirm(request, rows, action="undo_last_run", title="Undo the last run")

    def _confirm(self, request, rows, *, action, title, choices=(), revision=""):
        """The confirmation page of a plan (each target, where it stands and whether that was
        read live, where it goes, the SQL or why none, and what refuses it); on confirmation,
        the runs. A refused row stops the whole request: nothing is queued."""
        accepted = [row for row in rows if row.accepted]
        refused = [row for row in rows if row.blocks]
        if request.POST.get("confirm") == "yes" and accepted and not refused:
            self._queue(request, rows)
            return None
        downgrades = all(row.kind == "downgrade" for row in accepted)
        context = {
            **self.admin_site.each_context(request),
            "title": title,
            "opts": self.model._meta,
            "action": action,
            "selected": request.POST.getlist(admin.helpers.ACTION_CHECKBOX_NAME),
            "choose_revision": action == "downgrade_to_revision",
            "revisions": choices,
            "revision": revision,
            "rows": rows,
            "accepted": accepted,
            "refused": refused,
            "verb": "downgrade" if downgrades else "run it for",
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
        rows = planning.plan(self.targets_of(queryset), planning.Intent.blue_green(phase))
        self._queue(request, rows, prefix=f"{phase.title()}: ")


@admin.register(MigrationTarget)
class MigrationTargetAdmin(
    RunMigrationsActions, DecommissionAction, WideChangelist, admin.ModelAdmin
):
    actions = [*RunMigrationsActions.actions, "decommission"]
    change_form_template = "admin/tenants/migrationtarget/change_form.html"
    list_display = (
        "name",
        "kind",
        "provider",
        "region",
        "revision",
        "status",
        "phase",
        "hold",
        "drift",
        "last_migrated",
    )
    list_filter = (
        "kind",
        "provider",
        "region",
        "status",
        "drifted",
        "held",
        "canary",
        "revision",
        ("decommissioned_at", admin.EmptyFieldListFilter),
    )
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
        "drift",
        "schema_fingerprint",
        "verified_at",
        "drift_report_text",
        "decommissioned_at",
        "server",
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
                    "canary",
                    "backup_policy",
                )
            },
        ),
        (
            "Rollouts",
            {
                "fields": (
                    "server",
                    "window_days",
                    "window_start",
                    "window_end",
                    "window_timezone",
                ),
                "description": "A canary goes first in a rollout; a rollout waits for the "
                "target's weekly maintenance window (docs/rollouts.md).",
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
                    "decommissioned_at",
                    "created_at",
                    "updated_at",
                )
            },
        ),
        (
            "Schema verification",
            {"fields": ("drift", "schema_fingerprint", "verified_at", "drift_report_text")},
        ),
        ("Run history", {"fields": ("recent_runs",)}),
    )
    show_full_result_count = False

    @admin.display(description="held", ordering="held")
    def hold(self, obj):
        """ "held" for a held target, a neutral dash otherwise (not a red cross)."""
        return format_html("<strong>{}</strong>", "held") if obj.held else "–"

    @admin.display(description="last migrated", ordering="last_migrated_at")
    def last_migrated(self, obj):
        return _short_time(obj.last_migrated_at)

    @admin.display(description="drifted", ordering="drifted")
    def drift(self, obj):
        """A drifted schema stands out; any other shows a neutral mark, not a red cross that
        reads as an error."""
        if obj.drifted:
            return format_html(
                '<strong style="color: var(--error-fg, #ba2121)">{}</strong>', "drifted"
            )
        return "–" if obj.verified_at is None else "no"

    def get_urls(self):
        from django.urls import path

        urls = [
            path(
                "<int:object_id>/migrate/",
                self.admin_site.admin_view(self.migrate_view),
                name="tenants_migrationtarget_migrate",
            )
        ]
        return urls + super().get_urls()

    def migrate_view(self, request, object_id):
        """The *Migrate to head* button of a target's page: the planner's row for it, queued
        as the list's action does; back to the page with what was done or why not."""
        from django.core.exceptions import PermissionDenied
        from django.http import HttpResponseNotAllowed, HttpResponseRedirect
        from django.shortcuts import get_object_or_404

        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_run_migrations_permission(request):
            raise PermissionDenied
        target = get_object_or_404(MigrationTarget, pk=object_id)
        self._queue(request, planning.plan([target], planning.Intent.upgrade()))
        return HttpResponseRedirect(
            reverse("admin:tenants_migrationtarget_change", args=[target.pk])
        )

    def render_change_form(self, request, context, *args, **kwargs):
        context["can_run_migrations"] = self.has_run_migrations_permission(request)
        return super().render_change_form(request, context, *args, **kwargs)

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

    def decommission_one(self, obj, request):
        return actions.do_decommission_target(obj, acting_user=request.user)

    @admin.display(description="blue/green")
    def phase(self, obj):
        from migrator import phases
        from migrator.exceptions import MigratorError

        try:
            if not phases.has_phases():
                return "-"
            return phases.state(obj.revision).label
        except MigratorError:  # the script directory cannot be read: the dashboard says why
            return "?"

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
                    run.error_summary,
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


class TenantAddForm(forms.ModelForm):
    """A new tenant; a dedicated or external one may bring its database along: with a provider
    and no target chosen, its database is registered as a new target named after it (as
    ``POST /api/tenants/`` does), and the tenant-created signal queues its first migration."""

    database_provider = forms.ChoiceField(
        choices=[("", "---------"), *Provider.choices],
        required=False,
        help_text="A dedicated or external tenant with no target chosen: register its database "
        "as a new target named after the tenant, on this provider.",
    )
    database_vault_path = forms.CharField(
        required=False,
        max_length=255,
        validators=[vault_path_validator],
        help_text="With a provider: where its credentials are under VAULT_DATABASE_SECRETS_PATH "
        "(empty: the tenant id).",
    )

    class Meta:
        model = Tenant
        fields = ("id", "name", "strategy", "region", "target", "auto_migrate")

    def clean(self):
        cleaned = super().clean()
        strategy, tenant_id = cleaned.get("strategy"), cleaned.get("id")
        provider = cleaned.get("database_provider")
        if not provider:
            return cleaned
        if strategy == Strategy.SHARED or cleaned.get("target") is not None:
            raise ValidationError(
                {
                    "database_provider": "Only for a dedicated or external tenant with no target "
                    "chosen: leave it empty, or clear the target."
                }
            )
        if not tenant_id:
            return cleaned
        target = MigrationTarget(
            name=tenant_id,
            kind=strategy,
            provider=provider,
            region=cleaned.get("region") or DEFAULT_REGION,
            vault_path=cleaned.get("database_vault_path") or "",
        )
        try:
            target.full_clean()
        except ValidationError as exc:
            raise ValidationError(
                {
                    "database_provider": f"Its database cannot be registered as target "
                    f"{tenant_id}: " + " ".join(exc.messages)
                }
            ) from None
        cleaned["target"] = target
        return cleaned


@admin.register(Tenant)
class TenantAdmin(RunMigrationsActions, DecommissionAction, WideChangelist, admin.ModelAdmin):
    actions = [*RunMigrationsActions.actions, "decommission"]
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
    list_filter = (
        "strategy",
        "region",
        "target__provider",
        "target__status",
        "auto_migrate",
        ("decommissioned_at", admin.EmptyFieldListFilter),
    )
    search_fields = ("id", "name", "target__name")
    list_select_related = ("target",)
    autocomplete_fields = ("target",)
    show_full_result_count = False

    def targets_of(self, queryset):
        ids = queryset.exclude(target=None).values_list("target_id", flat=True).distinct()
        return list(MigrationTarget.objects.filter(pk__in=ids).order_by("name"))

    def get_readonly_fields(self, request, obj=None):
        # The tenant id names its Vault path and its database: it never changes once created.
        return ("id", "created_at", "decommissioned_at") if obj else ("created_at",)

    def get_exclude(self, request, obj=None):
        # A new tenant is never registered retired.
        return ("decommissioned_at",) if obj is None else ()

    def get_form(self, request, obj=None, **kwargs):
        if obj is None and request.user.has_perm("tenants.add_migrationtarget"):
            kwargs["form"] = TenantAddForm
        return super().get_form(request, obj, **kwargs)

    def save_model(self, request, obj, form, change):
        if obj.target is not None and obj.target.pk is None:
            # The database the add form registered along with the tenant.
            obj.target.save()
        super().save_model(request, obj, form, change)

    def decommission_one(self, obj, request):
        return actions.do_decommission_tenant(obj, acting_user=request.user)

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
class MigrationRunAdmin(WideChangelist, admin.ModelAdmin):
    actions = ["cancel_selected_runs"]

    @admin.display(description="asked", ordering="requested_revision")
    def asked(self, run):
        phase = f" ({run.phase})" if run.phase else ""
        return f"{run.get_kind_display().lower()} to {run.requested_revision}{phase}"

    @admin.display(description="revision")
    def revisions(self, run):
        if run.finished_at is None:
            return run.revision_before or "–"
        return f"{run.stood_at} → {run.revision_after or '?'}"

    @admin.display(description="took", ordering="duration_ms")
    def took(self, run):
        if run.duration_ms is None:
            return "–"
        if run.duration_ms < 1000:
            return f"{run.duration_ms} ms"
        return f"{run.duration_ms / 1000:.1f} s"

    @admin.display(description="why")
    def why(self, run):
        """The reason (the error's first line), cut between words; all of it on hover."""
        reason = run.reason
        if not reason:
            return ""
        return format_html(
            '<span title="{}">{}</span>', reason, textwrap.shorten(reason, 70, placeholder=" …")
        )

    @admin.display(description="trigger", ordering="trigger")
    def triggered(self, run):
        who = f" ({run.triggered_by.get_username()})" if run.triggered_by else ""
        return f"{run.get_trigger_display()}{who}"

    @admin.display(description="created", ordering="created_at")
    def created(self, run):
        return _short_time(run.created_at)

    # What matters in 1400 px: what was asked, where it went, how long it took, and why not.
    list_display = (
        "id",
        "target",
        "status",
        "asked",
        "revisions",
        "took",
        "why",
        "triggered",
        "created",
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
                    "rollout",
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
        (
            "Admin credentials",
            {
                "fields": (
                    "admin_credentials",
                    "credentials_user",
                    "credentials_lease",
                    "credentials_revoked",
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

    def has_run_migrations_permission(self, request):
        return request.user.has_perm("tenants.run_migrations")

    @admin.action(description="Cancel the selected queued runs", permissions=["run_migrations"])
    def cancel_selected_runs(self, request, queryset):
        cancelled, running = [], []
        for run in queryset.select_related("target"):
            if actions.do_cancel_run(run, acting_user=request.user):
                cancelled.append(run)
            elif run.status == "running":
                running.append(run)
        report_cancelled(self, request, cancelled, running)


@admin.register(Rollout)
class RolloutAdmin(admin.ModelAdmin):
    """A rollout's page: its waves, each target's state, the failures, what to do; *Resume*
    and *Abort* buttons (with ``tenants.run_migrations``). Rollouts are started by
    ``migrate_tenants --waves`` or ``POST /api/rollouts/``, and moved only by
    ``tenants.rollouts``: nothing here is edited by hand."""

    change_form_template = "admin/tenants/rollout/change_form.html"
    list_display = (
        "id",
        "status",
        "revision",
        "waves_spec",
        "wave",
        "created_by",
        "created_at",
        "finished_at",
    )
    list_filter = ("status",)
    list_select_related = ("created_by",)
    fields = (
        "status",
        "revision",
        "waves_spec",
        "budget",
        "bake_seconds",
        "bake_until",
        "per_server_concurrency",
        "note",
        "created_by",
        "trigger",
        "created_at",
        "started_at",
        "finished_at",
        "progress",
    )
    readonly_fields = fields

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False  # a page to read, with Resume and Abort: no Save buttons that save nothing

    def has_delete_permission(self, request, obj=None):
        return False

    @admin.display(description="wave")
    def wave(self, obj):
        return f"{min(obj.current_wave + 1, len(obj.waves))}/{len(obj.waves)}"

    @admin.display(description="failure budget")
    def budget(self, obj):
        parts = []
        if obj.max_failures is not None:
            parts.append(f"at most {obj.max_failures} failure(s)")
        if obj.max_failure_rate is not None:
            parts.append(f"at most {obj.max_failure_rate:g}% of the targets sent")
        return ", ".join(parts) or "-"

    @admin.display(description="waves and progress")
    def progress(self, obj):
        from tenants import rollouts

        data = rollouts.describe(obj)
        counts = data["counts"]
        summary = format_html(
            "<p>{} done, {} under way, {} failed, {} untouched, {} skipped</p>",
            counts["done"],
            counts["active"],
            counts["failed"],
            counts["pending"],
            counts["skipped"],
        )
        waves = format_html_join(
            "\n",
            "<h3>Wave {}{}</h3><table><thead><tr><th>Target</th><th>Region</th><th>Provider</th>"
            "<th>State</th><th>Run</th><th>Reason</th></tr></thead><tbody>{}</tbody></table>",
            (
                (
                    wave["wave"],
                    " (current)" if wave["wave"] == data["current_wave"] and obj.is_active else "",
                    format_html_join(
                        "\n",
                        "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>"
                        "<td>{}</td></tr>",
                        (
                            (
                                entry["target"],
                                " (canary)" if entry["canary"] else "",
                                entry["region"] or "",
                                entry["provider"] or "",
                                entry["state"],
                                format_html(
                                    '<a href="{}">#{}</a>',
                                    reverse(
                                        "admin:tenants_migrationrun_change", args=[entry["run"]]
                                    ),
                                    entry["run"],
                                )
                                if entry["run"]
                                else "",
                                entry["reason"] or "",
                            )
                            for entry in wave["targets"]
                        ),
                    ),
                )
                for wave in data["waves"]
            ),
        )
        return format_html("{}{}", summary, waves)

    def get_urls(self):
        from django.urls import path

        return [
            path(
                "<int:object_id>/steer/<str:verb>/",
                self.admin_site.admin_view(self.steer_view),
                name="tenants_rollout_steer",
            )
        ] + super().get_urls()

    def render_change_form(self, request, context, *args, **kwargs):
        context["can_run_migrations"] = request.user.has_perm("tenants.run_migrations")
        return super().render_change_form(request, context, *args, **kwargs)

    def steer_view(self, request, object_id, verb):
        """The *Resume* and *Abort* buttons: the same actions as ``manage.py rollout``."""
        from django.core.exceptions import PermissionDenied
        from django.http import Http404, HttpResponseNotAllowed, HttpResponseRedirect
        from django.shortcuts import get_object_or_404

        from tenants import rollouts

        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if verb not in ("resume", "abort"):
            raise Http404
        if not request.user.has_perm("tenants.run_migrations"):
            raise PermissionDenied
        rollout = get_object_or_404(Rollout, pk=object_id)
        done, refusal = rollouts.do_steer_rollout(rollout, verb, acting_user=request.user)
        if done is None:
            self.message_user(request, refusal, messages.ERROR)
        else:
            self.message_user(request, f"Rollout #{done.pk}: {done.status}. {done.note}".strip())
        return HttpResponseRedirect(reverse("admin:tenants_rollout_change", args=[rollout.pk]))
