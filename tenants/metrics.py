"""Prometheus metrics at ``/metrics``, read from the control plane's database at scrape time.

Runs are recorded by django-q2 workers in other processes, often on other hosts, so no process
holds the numbers in memory: the collector asks the database on every scrape and every web
process answers the same, however many workers and hosts there are. It is registered on a
``CollectorRegistry`` of its own (not prometheus_client's global one), so nothing a library
registers there leaks in, and nothing is counted per process.

A scrape costs a constant handful of GROUP BY queries (targets; finished runs; durations;
Vault errors; queued and running runs), never a loop over rows: the same five queries with ten
runs or a million. Counters are counts of rows, so deleting a target (its runs go with it)
lowers them, which Prometheus reads as a counter reset.

``METRICS_TOKEN``, when set, is required as ``Authorization: Bearer <token>``.
"""

import hmac
import logging

from django.conf import settings
from django.db.models import Count, F, Func, IntegerField, Min, Q, Sum
from django.db.models.functions import Coalesce
from django.http import HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

from tenants.models import (
    ACTIVE_RUN_STATUSES,
    FINISHED_RUN_STATUSES,
    MigrationRun,
    MigrationTarget,
    RunStatus,
    TargetStatus,
)

logger = logging.getLogger("tenants.metrics")

PREFIX = "tenant_migrations"
# Upper bounds of the run duration histogram, in seconds (+Inf is added).
DURATION_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600)
# Error codes of runs that failed on Vault, besides the codes of migrator.exceptions.VaultError
# and its children.
VAULT_ERROR_PREFIXES = ("vault_", "secret_")


class JSONArrayLength(Func):
    """The number of elements of a JSON array column, 0 for anything else.

    SQLite's JSON1 ``json_array_length``, PostgreSQL's ``jsonb_array_length`` (guarded, since it
    raises on a non-array), MySQL/MariaDB's ``JSON_LENGTH``. Django has no portable one.
    """

    function = "json_array_length"
    output_field = IntegerField()
    arity = 1

    def as_postgresql(self, compiler, connection, **extra_context):
        # The argument is a plain column (no query parameters), so repeating it is safe.
        return self.as_sql(
            compiler,
            connection,
            template="CASE WHEN jsonb_typeof(%(expressions)s) = 'array' "
            "THEN jsonb_array_length(%(expressions)s) ELSE 0 END",
            **extra_context,
        )

    def as_mysql(self, compiler, connection, **extra_context):
        return self.as_sql(compiler, connection, function="JSON_LENGTH", **extra_context)


def vault_error_codes() -> list[str]:
    """The error codes of every Vault error the engine raises, so each kind has a series (0 until
    the first one): an alert on ``increase()`` needs the series before the first error."""
    from migrator.exceptions import VaultError

    codes, pending = [], [VaultError]
    while pending:
        cls = pending.pop()
        codes.append(cls.code)
        pending.extend(cls.__subclasses__())
    return sorted(set(codes))


def _heads() -> tuple[str, ...] | None:
    """The head revision(s) of the script directory, or None when it cannot be read."""
    try:
        from tenants.actions import current_heads

        return tuple(current_heads())
    except Exception:  # noqa: BLE001 - the other metrics are still worth a scrape
        logger.warning("Cannot read the head revision(s) for /metrics", exc_info=True)
        return None


class ControlPlaneCollector:
    """Yields every ``tenant_migrations_*`` metric family, computed from the database."""

    def collect(self):
        heads = _heads()
        regions = set()
        yield from self._targets(heads, regions)
        yield from self._finished_runs()
        yield self._durations()
        yield self._vault_errors()
        yield from self._active_runs(regions)

    # --- Targets: one query ---------------------------------------------------------------

    def _targets(self, heads, regions):
        targets = GaugeMetricFamily(
            f"{PREFIX}_targets",
            "Migration targets by status, provider and region.",
            labels=["status", "provider", "region"],
        )
        behind = GaugeMetricFamily(
            f"{PREFIX}_targets_behind_head",
            "Targets whose recorded revision is not the script directory's head "
            "(including targets never checked).",
            labels=["provider", "region"],
        )
        drifted = GaugeMetricFamily(
            f"{PREFIX}_targets_drifted",
            "Targets whose schema differs from the reference for their revision.",
            labels=["provider", "region"],
        )
        aggregates = {"n": Count("id"), "drifted": Count("id", filter=Q(drifted=True))}
        at_head = set()
        if heads:
            # Several heads are recorded joined with ',' (migrator.runner).
            at_head = {*heads, ",".join(heads), ",".join(sorted(heads))}
            aggregates["behind"] = Count("id", filter=~Q(revision__in=sorted(at_head)))
        rows = (
            MigrationTarget.objects.active()
            .values("status", "provider", "region")
            .annotate(**aggregates)
            .order_by()
        )
        counts, per_place = {}, {}
        for row in rows:
            place = (row["provider"], row["region"])
            counts[(row["status"], *place)] = row["n"]
            totals = per_place.setdefault(place, {"behind": 0, "drifted": 0})
            totals["behind"] += row.get("behind", 0)
            totals["drifted"] += row["drifted"]
        # Every status of every provider and region in use, 0 included, so a panel or an alert
        # never sees a series vanish when its last target leaves the status.
        for provider, region in sorted(per_place):
            regions.add(region)
            for status in TargetStatus.values:
                targets.add_metric(
                    [status, provider, region], counts.get((status, provider, region), 0)
                )
            drifted.add_metric([provider, region], per_place[(provider, region)]["drifted"])
            if heads:
                behind.add_metric([provider, region], per_place[(provider, region)]["behind"])
        yield targets
        yield drifted
        if heads:
            yield behind
            head_info = GaugeMetricFamily(
                f"{PREFIX}_head_info",
                "The head revision(s) of the script directory this process reads (always 1).",
                labels=["revision"],
            )
            for head in heads:
                head_info.add_metric([head], 1)
            yield head_info

    # --- Finished runs and revisions applied: one query -----------------------------------

    def _finished_runs(self):
        runs = CounterMetricFamily(
            f"{PREFIX}_runs",
            "Finished migration runs by status, provider, region, trigger and kind.",
            labels=["status", "provider", "region", "trigger", "kind"],
        )
        applied = CounterMetricFamily(
            f"{PREFIX}_revisions_applied",
            "Revisions applied by finished runs (for a downgrade: reverted), including those a "
            "failed run completed before its failure.",
            labels=["provider", "region", "kind"],
        )
        rows = (
            MigrationRun.objects.filter(status__in=FINISHED_RUN_STATUSES)
            .values(
                "status",
                "trigger",
                "kind",
                provider=F("target__provider"),
                region=F("target__region"),
            )
            .annotate(n=Count("id"), applied=Coalesce(Sum(JSONArrayLength("applied")), 0))
            .order_by()
        )
        applied_by = {}
        for row in rows:
            runs.add_metric(
                [row["status"], row["provider"], row["region"], row["trigger"], row["kind"]],
                row["n"],
            )
            key = (row["provider"], row["region"], row["kind"])
            applied_by[key] = applied_by.get(key, 0) + row["applied"]
        for key in sorted(applied_by):
            applied.add_metric(list(key), applied_by[key])
        yield runs
        yield applied

    # --- Run durations: one query, a filtered COUNT per bucket -----------------------------

    def _durations(self):
        histogram = HistogramMetricFamily(
            f"{PREFIX}_run_duration_seconds",
            "Duration of finished runs, as recorded on each run (runs with none are left out).",
            labels=["provider", "region", "kind"],
        )
        buckets = {
            f"le_{i}": Count("id", filter=Q(duration_ms__lte=round(bound * 1000)))
            for i, bound in enumerate(DURATION_BUCKETS)
        }
        rows = (
            MigrationRun.objects.filter(status__in=FINISHED_RUN_STATUSES, duration_ms__isnull=False)
            .values("kind", provider=F("target__provider"), region=F("target__region"))
            .annotate(n=Count("id"), sum_ms=Sum("duration_ms"), **buckets)
            .order_by("provider", "region", "kind")
        )
        for row in rows:
            histogram.add_metric(
                [row["provider"], row["region"], row["kind"]],
                buckets=[
                    *((floatToGoString(b), row[f"le_{i}"]) for i, b in enumerate(DURATION_BUCKETS)),
                    ("+Inf", row["n"]),
                ],
                sum_value=row["sum_ms"] / 1000,
            )
        return histogram

    # --- Vault errors: one query -----------------------------------------------------------

    def _vault_errors(self):
        family = CounterMetricFamily(
            f"{PREFIX}_vault_errors",
            "Runs that failed reading their credentials from Vault, by error code.",
            labels=["kind"],
        )
        counts = dict.fromkeys(vault_error_codes(), 0)
        vault_error = Q(error_code__in=sorted(counts))
        for prefix in VAULT_ERROR_PREFIXES:
            vault_error |= Q(error_code__startswith=prefix)
        for code, n in (
            MigrationRun.objects.filter(vault_error)
            .values_list("error_code")
            .annotate(n=Count("id"))
            .order_by()
        ):
            counts[code] = n
        for code in sorted(counts):
            family.add_metric([code], counts[code])
        return family

    # --- Queued and running runs: one query ------------------------------------------------

    def _active_runs(self, regions):
        depth = GaugeMetricFamily(
            f"{PREFIX}_queue_depth",
            "Runs queued and not yet taken by a worker.",
            labels=["region"],
        )
        oldest = GaugeMetricFamily(
            f"{PREFIX}_oldest_queued_run_age_seconds",
            "Age of the oldest queued run (0 when none is queued).",
            labels=["region"],
        )
        running = GaugeMetricFamily(
            f"{PREFIX}_runs_in_progress", "Runs a worker is running now.", labels=["region"]
        )
        rows = (
            MigrationRun.objects.filter(status__in=ACTIVE_RUN_STATUSES)
            .values(region=F("target__region"))
            .annotate(
                queued=Count("id", filter=Q(status=RunStatus.QUEUED)),
                running=Count("id", filter=Q(status=RunStatus.RUNNING)),
                oldest=Min("created_at", filter=Q(status=RunStatus.QUEUED)),
            )
            .order_by()
        )
        by_region = {row["region"]: row for row in rows}
        now = timezone.now()
        for region in sorted(regions | set(by_region)):
            row = by_region.get(region, {"queued": 0, "running": 0, "oldest": None})
            depth.add_metric([region], row["queued"])
            running.add_metric([region], row["running"])
            age = (now - row["oldest"]).total_seconds() if row["oldest"] else 0
            oldest.add_metric([region], max(age, 0))
        yield depth
        yield oldest
        yield running


registry = CollectorRegistry(auto_describe=False)
registry.register(ControlPlaneCollector())


def _authorized(request) -> bool:
    token = settings.METRICS_TOKEN
    if not token:
        return True
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )


@never_cache
@require_GET
def metrics_view(request):
    """``GET /metrics``: every metric in the Prometheus text format, read from the database now.

    401 without ``Authorization: Bearer <METRICS_TOKEN>`` when that setting is set.
    """
    if not _authorized(request):
        response = HttpResponse(
            "A bearer token is required.\n", status=401, content_type="text/plain"
        )
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
