"""Registering tenants from the SaaS's own provisioning (the original design's
``TenantDatabaseProvisionedIntegrationEvent``), one at a time (``POST /api/tenants/``) or by the
thousand (``manage.py import_tenants``).

An event says who the tenant is and where its database lives::

    {"tenant_id": "acme", "name": "Acme", "database_strategy": "dedicated",
     "database_provider": "postgresql", "region": "eu", "vault_path": "",
     "database_created": true}

``do_register_tenants`` takes a list of events, validated by ``EventSerializer``, and registers
them in bulk (a few queries per 500 events, never one save per row): a shared-tier tenant joins
its region's shared database (created when the region has none); a dedicated or external one
gets a target of its own, named after it. When ``database_created`` is true, the first migration
of the tenant's database is planned (``tenants.planning``) and queued
(``tenants.actions.do_enqueue_plan``), as the tenant-created signal does. An event for a tenant
already registered with the same values changes nothing; with other values it is a conflict
(the API's 409) or, for an upsert (``update=True``, the import), an update of what may change.
"""

import csv
import json
from dataclasses import dataclass, field

from django.db import transaction
from django.utils import timezone
from rest_framework import serializers

from tenants import actions, planning
from tenants.models import (
    DEFAULT_REGION,
    MigrationRun,
    MigrationTarget,
    Provider,
    Strategy,
    Tenant,
    Trigger,
    slug_validator,
    vault_path_validator,
)

# The columns of an import or export file, in order.
COLUMNS = [
    "tenant_id",
    "name",
    "database_strategy",
    "database_provider",
    "region",
    "vault_path",
    "database_created",
    "status",
    "canary",
]
ACTIVE, DECOMMISSIONED = "active", "decommissioned"

CREATED, UPDATED, UNCHANGED, CONFLICT, INVALID = (
    "created",
    "updated",
    "unchanged",
    "conflict",
    "invalid",
)

# Ids per IN list: under SQLite's limit of 999 parameters per statement.
_CHUNK = 500


class LowerChoiceField(serializers.ChoiceField):
    """A choice given in any case (the original design sends "Dedicated", "PostgreSQL")."""

    def to_internal_value(self, data):
        if isinstance(data, str):
            data = data.strip().lower()
        return super().to_internal_value(data)


def _choice(choices, what, **kwargs):
    allowed = ", ".join(choices)
    return LowerChoiceField(
        choices=choices,
        error_messages={
            "invalid_choice": f'"{{input}}" is not a {what}: use one of {allowed}.',
            "required": f"This field is required: one of {allowed}.",
            "null": f"This field may not be null: one of {allowed}.",
        },
        **kwargs,
    )


class EventSerializer(serializers.Serializer):
    """A provisioning event: the tenant and where its database lives."""

    tenant_id = serializers.CharField(
        max_length=63,
        validators=[slug_validator],
        help_text="The tenant's id in the SaaS: 1 to 63 lower-case letters, digits, '-' or '_'.",
    )
    name = serializers.CharField(max_length=200, help_text="The tenant's display name.")
    database_strategy = _choice(
        Strategy.values,
        "database strategy",
        help_text="shared: the region's shared database; dedicated: a database of its own; "
        "external: a database of its own that the customer runs.",
    )
    database_provider = _choice(Provider.values, "database provider")
    region = serializers.CharField(
        max_length=63,
        required=False,
        allow_blank=True,
        default=DEFAULT_REGION,
        help_text=f"Region of the database (default {DEFAULT_REGION!r}): lower-case letters, "
        "digits, '-' or '_'.",
    )
    vault_path = serializers.CharField(
        max_length=255,
        required=False,
        allow_blank=True,
        default="",
        help_text="Path of the database's admin credentials under VAULT_DATABASE_SECRETS_PATH. "
        "Empty: the tenant id for a database of its own, the shared database's path otherwise.",
    )
    database_created = serializers.BooleanField(
        required=False,
        default=False,
        help_text="The database exists: queue its first migration now.",
    )
    status = _choice(
        [ACTIVE, DECOMMISSIONED],
        "status",
        required=False,
        default=ACTIVE,
        help_text="decommissioned: retired, no more runs (import and export files).",
    )
    canary = serializers.BooleanField(
        required=False,
        allow_null=True,
        default=None,
        help_text="A dedicated or external tenant's database goes first in rollouts "
        "(docs/rollouts.md). Left out: as it is.",
    )

    def validate_region(self, value):
        value = value.strip() or DEFAULT_REGION
        slug_validator(value)
        return value

    def validate_vault_path(self, value):
        value = value.strip()
        if value:
            vault_path_validator(value)
        return value


@dataclass
class Registration:
    """What registering one event did, or would do."""

    event: dict
    line: int | None = None
    outcome: str = ""  # CREATED, UPDATED, UNCHANGED, CONFLICT or INVALID
    tenant: Tenant | None = None
    errors: dict = field(default_factory=dict)  # field -> message (INVALID)
    differences: dict = field(default_factory=dict)  # field -> (registered, event)
    dispatch: object = None  # the actions.Dispatch of its first migration, when one was asked
    run: MigrationRun | None = None  # that run, or the target's latest one

    @property
    def tenant_id(self):
        return self.event.get("tenant_id", "")

    @property
    def message(self):
        """One line for a person: what was done, or why not."""
        where = f"line {self.line}: " if self.line else ""
        who = self.tenant_id or "?"
        if self.outcome == INVALID:
            problems = "; ".join(f"{name}: {message}" for name, message in self.errors.items())
            return f"{where}{who}: invalid: {problems}"
        if self.outcome == CONFLICT:
            return f"{where}{who}: {conflict_message(self)}"
        text = f"{where}{who}: {self.outcome}"
        if self.differences:
            text += " (" + ", ".join(_difference(k, v) for k, v in self.differences.items()) + ")"
        if self.dispatch is not None:
            text += f"; {self.dispatch.message}"
        return text


def _difference(name, values):
    registered, event = values
    return f"{name}: registered {registered!r}, now {event!r}"


def conflict_message(registration):
    if registration.errors:
        return "; ".join(registration.errors.values())
    return (
        f"tenant {registration.tenant_id} is already registered with other values: "
        + "; ".join(
            f"{name} is {registered!r}, the event says {event!r}"
            for name, (registered, event) in registration.differences.items()
        )
        + ". Change it with PATCH /api/tenants/"
        + registration.tenant_id
        + " or import_tenants, or send the registered values."
    )


def validate_events(rows):
    """Validate raw events (dicts; ``rows`` yields ``(line, dict)``). Returns a list of
    ``Registration``: invalid ones carry ``errors`` (field -> what is allowed), the others the
    cleaned event. A tenant id seen twice is invalid the second time."""
    registrations, seen = [], {}
    # One serializer for every row: its fields are built once (DRF copies them per instance).
    form = EventSerializer()
    for line, raw in rows:
        if not isinstance(raw, dict):
            registrations.append(
                Registration(
                    {},
                    line,
                    INVALID,
                    errors={"non_field_errors": "Expected an object of " + ", ".join(COLUMNS)},
                )
            )
            continue
        if "_extra" in raw:
            registrations.append(
                Registration(
                    {"tenant_id": str(raw.get("tenant_id", ""))},
                    line,
                    INVALID,
                    errors={
                        "non_field_errors": f"More values than columns ({len(COLUMNS)} at "
                        f"most: {', '.join(COLUMNS)}); quote a value that holds a comma."
                    },
                )
            )
            continue
        try:
            event = form.run_validation(raw)
        except serializers.ValidationError as exc:
            errors = {
                name: " ".join(str(m) for m in messages) for name, messages in exc.detail.items()
            }
            registrations.append(
                Registration(
                    {"tenant_id": str(raw.get("tenant_id", ""))}, line, INVALID, errors=errors
                )
            )
            continue
        event = dict(event)
        first = seen.get(event["tenant_id"])
        if first is not None:
            where = f"line {first}" if first else "an earlier event"
            registrations.append(
                Registration(
                    event,
                    line,
                    INVALID,
                    errors={
                        "tenant_id": f"{event['tenant_id']} is already in this file ({where})."
                    },
                )
            )
            continue
        seen[event["tenant_id"]] = line or 0
        registrations.append(Registration(event, line))
    return registrations


def shared_target_name(region):
    """The name a region's shared database gets when a registration creates it."""
    return "shared" if region == DEFAULT_REGION else f"shared-{region}"


def event_of(tenant):
    """The event that registers ``tenant`` as it stands (export, PATCH)."""
    target = tenant.target
    return {
        "tenant_id": tenant.id,
        "name": tenant.name,
        "database_strategy": tenant.strategy,
        "database_provider": target.provider if target else "",
        "region": tenant.region,
        "vault_path": target.effective_vault_path if target else "",
        "database_created": bool(target and target.revision),
        "status": DECOMMISSIONED if tenant.decommissioned else ACTIVE,
        "canary": bool(target and target.canary and tenant.strategy != Strategy.SHARED),
    }


def _chunks(values):
    values = list(values)
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def do_register_tenants(
    registrations,
    *,
    trigger=Trigger.API,
    acting_user=None,
    update=False,
    migrate=True,
    dry_run=False,
):
    """Register the valid ``registrations`` (from ``validate_events``), in one transaction.

    A new tenant is created (with its own target, or in its region's shared one); a tenant
    registered with the same values is unchanged; with other values it is a CONFLICT, or with
    ``update`` an update of its name, its own database's provider and Vault path, and its status
    (decommissioned or active again). Its strategy and region cannot change (a database move):
    INVALID. With ``migrate``, a tenant whose event says ``database_created`` gets its database's
    first migration queued (through the planner, as the tenant-created signal does) when its
    database has never had a run. ``dry_run`` writes nothing and queues nothing.
    Returns ``registrations``, each with its ``outcome``.
    """
    pending = [r for r in registrations if not r.outcome]
    ids = [r.tenant_id for r in pending]
    tenants = {}
    for chunk in _chunks(ids):
        tenants.update(
            (t.id, t) for t in Tenant.objects.filter(id__in=chunk).select_related("target")
        )
    regions = {
        r.event["region"] for r in pending if r.event["database_strategy"] == Strategy.SHARED
    }
    shared = {
        t.region: t
        for t in MigrationTarget.objects.filter(kind=Strategy.SHARED, region__in=sorted(regions))
    }
    own_names = [r.tenant_id for r in pending if r.event["database_strategy"] != Strategy.SHARED]
    own_names += [shared_target_name(region) for region in regions if region not in shared]
    targets, owned = {}, set()
    for chunk in _chunks(own_names):
        targets.update((t.name, t) for t in MigrationTarget.objects.filter(name__in=chunk))
        owned.update(
            Tenant.objects.filter(target__name__in=chunk).values_list("target__name", flat=True)
        )

    now = timezone.now()
    new_targets, new_tenants, changed_tenants, changed_targets = {}, [], {}, {}
    for registration in pending:
        tenant = tenants.get(registration.tenant_id)
        if tenant is None:
            _plan_new(registration, shared, targets, owned, new_targets, new_tenants)
        else:
            registration.tenant = tenant
            _compare(registration, tenant, update, now, changed_tenants, changed_targets)

    if dry_run:
        return registrations
    with transaction.atomic():
        if new_targets:
            MigrationTarget.objects.bulk_create(list(new_targets.values()), batch_size=_CHUNK)
            # Fetched again: bulk_create sets no primary key on MySQL/MariaDB.
            created = {}
            for chunk in _chunks(new_targets):
                created.update((t.name, t) for t in MigrationTarget.objects.filter(name__in=chunk))
            for tenant in new_tenants:
                tenant.target = created[tenant.target.name]
        if new_tenants:
            Tenant.objects.bulk_create(new_tenants, batch_size=_CHUNK)
        if changed_tenants:
            Tenant.objects.bulk_update(
                list(changed_tenants.values()), ["name", "decommissioned_at"], batch_size=_CHUNK
            )
        if changed_targets:
            MigrationTarget.objects.bulk_update(
                list(changed_targets.values()),
                ["provider", "vault_path", "decommissioned_at", "canary", "updated_at"],
                batch_size=_CHUNK,
            )
            actions.do_cancel_queued_runs(
                [t for t in changed_targets.values() if t.decommissioned_at],
                acting_user=acting_user,
            )
        if migrate:
            _queue_first_migrations(registrations, trigger=trigger, acting_user=acting_user)
    return registrations


def _plan_new(registration, shared, targets, owned, new_targets, new_tenants):
    event = registration.event
    strategy, region = event["database_strategy"], event["region"]
    if event["status"] == DECOMMISSIONED:
        registration.outcome = INVALID
        registration.errors = {"status": "A new tenant cannot be registered decommissioned."}
        return
    if strategy == Strategy.SHARED:
        target = shared.get(region) or new_targets.get(shared_target_name(region))
        if target is None:
            name = shared_target_name(region)
            if name in targets:
                registration.outcome = CONFLICT
                registration.errors = {
                    "region": f"Region {region!r} has no shared database, and the name {name!r} "
                    f"is taken by a {targets[name].kind} target: create the region's shared "
                    "target (kind 'shared') in the admin or with POST /api/targets/ first."
                }
                return
            target = _new_target(name, Strategy.SHARED, event)
            new_targets[name] = target
        problem = _shared_problem(target, event)
        if problem:
            registration.outcome = CONFLICT
            registration.errors = problem
            return
    else:
        name = registration.tenant_id
        target = targets.get(name) or new_targets.get(name)
        if target is None:
            target = _new_target(name, strategy, event)
            new_targets[name] = target
        else:
            problem = _own_target_problem(target, event, owned)
            if problem:
                registration.outcome = CONFLICT
                registration.errors = problem
                return
    registration.outcome = CREATED
    registration.tenant = Tenant(
        id=registration.tenant_id,
        name=event["name"],
        strategy=strategy,
        region=region,
        target=target,
    )
    new_tenants.append(registration.tenant)


def _new_target(name, kind, event):
    target = MigrationTarget(
        name=name, kind=kind, provider=event["database_provider"], region=event["region"]
    )
    target.vault_path = event["vault_path"] or target.default_vault_path()
    target.canary = kind != Strategy.SHARED and bool(event.get("canary"))
    return target


def _shared_problem(target, event):
    if target.decommissioned_at is not None:
        return {
            "region": f"The shared database of region {event['region']!r} ({target.name}) is "
            "decommissioned."
        }
    if target.provider != event["database_provider"]:
        return {
            "database_provider": f"The shared database of region {event['region']!r} "
            f"({target.name}) is {target.provider}; the event says {event['database_provider']}."
        }
    if event["vault_path"] and event["vault_path"] != target.effective_vault_path:
        return {
            "vault_path": f"The shared database of region {event['region']!r} ({target.name}) "
            f"reads its credentials at {target.effective_vault_path!r}; the event says "
            f"{event['vault_path']!r}. Leave vault_path empty for a shared tenant."
        }
    return {}


def _own_target_problem(target, event, owned):
    """Why an existing target named after a new tenant cannot be its database, or {}."""
    if target.name in owned:
        return {"tenant_id": f"A target named {target.name} already belongs to another tenant."}
    if target.decommissioned_at is not None:
        return {"tenant_id": f"The target {target.name} is decommissioned."}
    expected = {
        "database_strategy": (target.kind, event["database_strategy"]),
        "database_provider": (target.provider, event["database_provider"]),
        "region": (target.region, event["region"]),
    }
    if event["vault_path"]:
        expected["vault_path"] = (target.effective_vault_path, event["vault_path"])
    wrong = {k: v for k, v in expected.items() if v[0] != v[1]}
    if wrong:
        return {
            "tenant_id": f"The target {target.name} exists with other values: "
            + "; ".join(_difference(k, v) for k, v in wrong.items())
            + "."
        }
    return {}


def _compare(registration, tenant, update, now, changed_tenants, changed_targets):
    event = registration.event
    target = tenant.target
    registered = event_of(tenant)
    fields = ["name", "database_strategy", "region", "database_provider"]
    if event["vault_path"]:
        fields.append("vault_path")
    if update:
        fields.append("status")
    if event.get("canary") is not None and tenant.strategy != Strategy.SHARED:
        fields.append("canary")
    differences = {
        name: (registered[name], event[name]) for name in fields if registered[name] != event[name]
    }
    registration.differences = differences
    if not differences:
        registration.outcome = UNCHANGED
        return
    if not update:
        registration.outcome = CONFLICT
        return
    fixed = [name for name in ("database_strategy", "region") if name in differences]
    if tenant.strategy == Strategy.SHARED:
        fixed += [name for name in ("database_provider", "vault_path") if name in differences]
    if fixed:
        registration.outcome = INVALID
        registration.errors = {
            name: f"{name} of tenant {tenant.id} is {differences[name][0]!r} and cannot be "
            + (
                "changed by registering it: decommission the tenant and register a new one."
                if name in ("database_strategy", "region")
                else f"changed for one tenant: it belongs to the shared database {target.name}."
            )
            for name in fixed
        }
        return
    registration.outcome = UPDATED
    if "name" in differences:
        tenant.name = event["name"]
        changed_tenants[tenant.id] = tenant
    if "status" in differences:
        retire = event["status"] == DECOMMISSIONED
        tenant.decommissioned_at = now if retire else None
        changed_tenants[tenant.id] = tenant
        if tenant.strategy != Strategy.SHARED:
            target.decommissioned_at = now if retire else None
            target.updated_at = now
            changed_targets[target.pk] = target
    if "canary" in differences:
        target.canary = event["canary"]
        target.updated_at = now
        changed_targets[target.pk] = target
    if "database_provider" in differences or "vault_path" in differences:
        target.provider = event["database_provider"]
        if event["vault_path"]:
            target.vault_path = event["vault_path"]
        target.updated_at = now
        changed_targets[target.pk] = target


def _queue_first_migrations(registrations, *, trigger, acting_user):
    """Plan and queue the first migration of each registered tenant whose event says its
    database was created and whose database has never had a run (a shared database: unless it
    is recorded at head)."""
    wanted = [
        r
        for r in registrations
        if r.outcome in (CREATED, UNCHANGED, UPDATED)
        and r.event.get("database_created")
        and not r.tenant.decommissioned
    ]
    if not wanted:
        return
    target_ids = {r.tenant.target_id for r in wanted}
    ran = set()
    for chunk in _chunks(target_ids):
        ran.update(
            MigrationRun.objects.filter(target_id__in=chunk)
            .values_list("target_id", flat=True)
            .distinct()
        )
    by_target = {}
    for registration in wanted:
        target = registration.tenant.target
        if target.pk in ran:
            continue
        by_target.setdefault(target.pk, (target, []))[1].append(registration)
    own = [t for t, _ in by_target.values() if t.kind != Strategy.SHARED]
    shared = [t for t, _ in by_target.values() if t.kind == Strategy.SHARED]
    rows = planning.plan(own, planning.Intent.upgrade())
    rows += planning.plan(shared, planning.Intent.upgrade(skip_recorded_at_head=True))
    dispatches = actions.do_enqueue_plan(rows, trigger=trigger, acting_user=acting_user)
    for dispatch in dispatches:
        for registration in by_target[dispatch.target.pk][1]:
            registration.dispatch = dispatch
            registration.run = dispatch.run
    for row in rows:
        if not row.accepted:
            for registration in by_target[row.target.pk][1]:
                registration.dispatch = actions.Dispatch(row.target, None, False, row.reason)


# --- Files -------------------------------------------------------------------------------------


class FileError(Exception):
    """A file that cannot be read as events at all (not its rows: those are INVALID)."""


def read_events(path):
    """``(line, dict)`` for each event of a CSV (a header row naming the columns) or JSON file
    (a list of objects, or one object per line). The line is where the row starts."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            text = handle.read()
    except OSError as exc:
        raise FileError(f"Cannot read {path}: {exc.strerror}.") from None
    except UnicodeDecodeError as exc:
        raise FileError(f"{path} is not UTF-8 text: {exc.reason} at byte {exc.start}.") from None
    stripped = text.lstrip()
    if stripped.startswith("[") or stripped.startswith("{"):
        return _read_json(path, text)
    return _read_csv(path, text)


def _read_json(path, text):
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if isinstance(data, list):
        # One event per array element; its line is the line its object starts on.
        decoder, events, position = json.JSONDecoder(), [], text.index("[") + 1
        for _ in data:
            while text[position] in " \t\r\n,":
                position += 1
            value, end = decoder.raw_decode(text, position)
            events.append((text.count("\n", 0, position) + 1, value))
            position = end
        return events
    if isinstance(data, dict):
        return [(1, data)]
    events = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            events.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise FileError(
                f"{path}, line {number}: not JSON ({exc.msg}, column {exc.colno}). A JSON file "
                "holds a list of events or one event per line."
            ) from None
    return events


def _read_csv(path, text):
    reader = csv.DictReader(text.splitlines(keepends=True))
    header = [name.strip() for name in reader.fieldnames or []]
    missing = [name for name in ("tenant_id", "name", "database_strategy") if name not in header]
    if missing or "database_provider" not in header:
        raise FileError(
            f"{path}: the first line must name the columns ({', '.join(COLUMNS)}; region, "
            "vault_path, database_created, status and canary may be left out); it has "
            f"{', '.join(header) or 'nothing'}."
        )
    reader.fieldnames = header
    unknown = [name for name in header if name not in COLUMNS]
    if unknown:
        raise FileError(
            f"{path}: unknown column(s) {', '.join(unknown)}; the columns are {', '.join(COLUMNS)}."
        )
    events = []
    for row in reader:
        line = reader.line_num
        if None in row:
            events.append((line, {"tenant_id": row.get("tenant_id") or "", "_extra": row[None]}))
            continue
        events.append((line, {k: v for k, v in row.items() if v not in (None, "")}))
    return events


def write_events(tenants, handle, fmt):
    """Write ``tenants`` as an import file (CSV or JSON) to ``handle``."""
    events = (event_of(tenant) for tenant in tenants)
    if fmt == "json":
        handle.write("[\n")
        first = True
        for event in events:
            handle.write(("" if first else ",\n") + json.dumps(event))
            first = False
        handle.write("\n]\n")
        return
    writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for event in events:
        writer.writerow(
            {
                **event,
                "database_created": str(event["database_created"]).lower(),
                "canary": str(event["canary"]).lower(),
            }
        )
