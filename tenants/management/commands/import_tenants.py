"""``manage.py import_tenants FILE``: register or update many tenants from a CSV or JSON file."""

import sys
from collections import Counter

from django.core.management.base import BaseCommand, CommandError

from tenants.models import Trigger
from tenants.registration import (
    COLUMNS,
    CONFLICT,
    CREATED,
    INVALID,
    UNCHANGED,
    UPDATED,
    FileError,
    do_register_tenants,
    read_events,
    validate_events,
)

EXIT_OK, EXIT_INVALID_ROWS, EXIT_USAGE = 0, 1, 2


class Command(BaseCommand):
    help = (
        "Register the tenants of FILE, or update those registered (an upsert): CSV with a header "
        f"line ({', '.join(COLUMNS)}; region, vault_path, database_created and status may be "
        "left out) or JSON (a list of events, or one per line), as `export_tenants` writes. "
        "Reports created, updated, unchanged and invalid rows with their line numbers; the valid "
        "rows are written even when others are invalid. A status of 'decommissioned' retires a "
        "tenant. Exit status: 0 every row valid, 1 some rows invalid, 2 the file could not be "
        "read."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", help="a .csv or .json file")
        parser.add_argument(
            "--dry-run", action="store_true", help="report what would be done; write nothing"
        )
        parser.add_argument(
            "--migrate",
            action="store_true",
            help="queue the first migration of each new tenant whose row says database_created "
            "(and of registered ones whose database never had a run)",
        )

    def handle(self, *args, file, dry_run, migrate, **options):
        verbosity = options["verbosity"]
        try:
            events = read_events(file)
        except FileError as exc:
            raise CommandError(str(exc), returncode=EXIT_USAGE) from None
        registrations = validate_events(events)
        do_register_tenants(
            registrations,
            trigger=Trigger.COMMAND,
            update=True,
            migrate=migrate and not dry_run,
            dry_run=dry_run,
        )
        counts = Counter(INVALID if r.outcome == CONFLICT else r.outcome for r in registrations)
        would = "would be " if dry_run else ""
        for registration in registrations:
            if registration.outcome in (INVALID, CONFLICT):
                self.stderr.write(registration.message)
            elif verbosity >= 2 or (verbosity >= 1 and registration.outcome == UPDATED):
                self.stdout.write(registration.message)
        queued = [r for r in registrations if r.dispatch is not None]
        runs = {r.dispatch.run.pk for r in queued if r.dispatch.created}
        for reason in sorted({r.dispatch.message for r in queued if not r.dispatch.carried_out}):
            self.stderr.write(reason)
        invalid_lines = [str(r.line) for r in registrations if r.outcome in (INVALID, CONFLICT)]
        summary = (
            f"{len(registrations)} row(s): {counts[CREATED]} {would}created, "
            f"{counts[UPDATED]} {would}updated, {counts[UNCHANGED]} unchanged, "
            f"{counts[INVALID]} invalid"
        )
        if invalid_lines:
            shown = ", ".join(invalid_lines[:20]) + (", …" if len(invalid_lines) > 20 else "")
            summary += f" (line {shown})"
        summary += "."
        if migrate and not dry_run:
            summary += f" {len(runs)} first migration(s) queued."
        if dry_run:
            summary += " Dry run: nothing was written."
        self.stdout.write(summary)
        if counts[INVALID]:
            sys.exit(EXIT_INVALID_ROWS)
