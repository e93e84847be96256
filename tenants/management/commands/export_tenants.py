"""``manage.py export_tenants``: every tenant as a file ``import_tenants`` reads back."""

from django.core.management.base import BaseCommand, CommandError

from tenants.models import Tenant
from tenants.registration import write_events


class Command(BaseCommand):
    help = (
        "Write every tenant (its id, name, database strategy, provider, region, Vault path, "
        "whether its database has a revision, and its status) as CSV or JSON, to standard "
        "output or --output FILE. `import_tenants` reads the file back unchanged."
    )

    def add_arguments(self, parser):
        parser.add_argument("--format", choices=("csv", "json"), default="csv")
        parser.add_argument("-o", "--output", metavar="FILE", help="write here, not to stdout")

    def handle(self, *args, format, output, **options):
        tenants = Tenant.objects.select_related("target").order_by("id").iterator(chunk_size=2000)
        if not output:
            self.stdout.ending = ""  # the writer ends its own lines
            write_events(tenants, self.stdout, format)
            return
        try:
            with open(output, "w", encoding="utf-8", newline="") as handle:
                write_events(tenants, handle, format)
        except OSError as exc:
            raise CommandError(f"Cannot write {output}: {exc.strerror}.", returncode=2) from None
        self.stderr.write(f"Wrote {Tenant.objects.count()} tenant(s) to {output}.")
