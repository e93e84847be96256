"""``manage.py rollout list|show|resume|abort``: follow and steer rollouts (docs/rollouts.md).

A rollout is started by ``migrate_tenants <selection> --waves …``. Exit codes: 0 completed (or,
for ``list``, ``show`` and ``abort``, done), 1 halted or aborted (``resume --wait``), 2 usage
(an unknown id, a rollout that cannot be resumed or aborted).
"""

import json
import sys
import time

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError
from django.core.serializers.json import DjangoJSONEncoder

from tenants import rollouts
from tenants.models import ACTIVE_ROLLOUT_STATUSES, Rollout, RolloutStatus

EXIT_FAILED = 1
EXIT_USAGE = 2


def wait_for(rollout, stream, *, timeout=0, poll=1.0):
    """Step ``rollout`` on and follow it until it is halted, completed or aborted (or
    ``timeout`` seconds, 0: no limit); write a line to ``stream`` at each change. Returns it."""
    deadline = time.monotonic() + timeout if timeout else None
    last = None
    while True:
        rollout = rollouts.advance(rollout)
        counts = rollouts.describe(rollout)["counts"]
        line = (
            f"Rollout #{rollout.pk}: {rollout.status}, wave "
            f"{min(rollout.current_wave + 1, len(rollout.waves))}/{len(rollout.waves)}: "
            f"{counts['done']} done, {counts['active']} under way, {counts['failed']} failed, "
            f"{counts['pending']} untouched"
        )
        if line != last:
            stream.write(line)
            last = line
        if rollout.status not in ACTIVE_ROLLOUT_STATUSES:
            return rollout
        if deadline is not None and time.monotonic() > deadline:
            stream.write(f"Stopped waiting after {timeout}s; the rollout goes on.")
            return rollout
        time.sleep(poll)


def exit_code(rollout):
    if rollout.status == RolloutStatus.COMPLETED:
        return 0
    if rollout.status in (RolloutStatus.HALTED, RolloutStatus.ABORTED):
        return EXIT_FAILED
    return 0


class Command(BaseCommand):
    help = (
        "Follow and steer rollouts started by `migrate_tenants --waves`: list, show ID, "
        "resume ID [--wait], abort ID. Exit code: 0 completed (or done), 1 halted or aborted "
        "(resume --wait), 2 bad usage."
    )

    def add_arguments(self, parser):
        verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
        listing = verbs.add_parser("list", help="rollouts, newest first")
        listing.add_argument("--json", action="store_true")
        listing.add_argument("--limit", type=int, default=50)
        show = verbs.add_parser("show", help="a rollout's waves, progress and failures")
        show.add_argument("id", type=int)
        show.add_argument("--json", action="store_true")
        resume = verbs.add_parser(
            "resume", help="go on with a halted rollout (after the revision was fixed)"
        )
        resume.add_argument("id", type=int)
        resume.add_argument("--wait", action="store_true", help="follow it until it ends")
        resume.add_argument("--timeout", type=int, default=0, metavar="SECONDS")
        resume.add_argument("--as-user", metavar="USERNAME")
        abort = verbs.add_parser(
            "abort", help="stop a rollout: nothing more is queued, untouched targets stay so"
        )
        abort.add_argument("id", type=int)
        abort.add_argument("--as-user", metavar="USERNAME")

    def handle(self, *args, **options):
        return getattr(self, f"_{options['verb']}")(options)

    def _rollout(self, rollout_id):
        rollout = Rollout.objects.filter(pk=rollout_id).first()
        if rollout is None:
            raise CommandError(
                f"No rollout #{rollout_id}: `manage.py rollout list` shows them.",
                returncode=EXIT_USAGE,
            )
        return rollout

    def _user(self, options):
        username = options.get("as_user")
        if not username:
            return None
        user = get_user_model().objects.filter(username=username).first()
        if user is None or not user.has_perm("tenants.run_migrations"):
            raise CommandError(
                f"{username!r} is not a control-plane user with the 'tenants.run_migrations' "
                "permission (Can run tenant migrations).",
                returncode=EXIT_USAGE,
            )
        return user

    def _list(self, options):
        found = list(Rollout.objects.order_by("-created_at", "-id")[: max(options["limit"], 1)])
        if options["json"]:
            payload = [
                {
                    "id": r.pk,
                    "status": r.status,
                    "revision": r.revision,
                    "waves_spec": r.waves_spec,
                    "current_wave": min(r.current_wave + 1, len(r.waves)),
                    "wave_count": len(r.waves),
                    "targets": len(r.target_ids),
                    "created_at": r.created_at,
                    "finished_at": r.finished_at,
                }
                for r in found
            ]
            self.stdout.write(json.dumps(payload, indent=2, cls=DjangoJSONEncoder))
            return
        if not found:
            self.stderr.write("No rollout yet: start one with `migrate_tenants --all --waves …`.")
        for rollout in found:
            self.stdout.write(rollouts.summary_line(rollout))

    def _show(self, options):
        rollout = self._rollout(options["id"])
        if options["json"]:
            self.stdout.write(
                json.dumps(rollouts.describe(rollout), indent=2, cls=DjangoJSONEncoder)
            )
        else:
            self.stdout.write(rollouts.show_text(rollout))

    def _resume(self, options):
        rollout = self._rollout(options["id"])
        resumed = rollouts.do_resume_rollout(rollout, acting_user=self._user(options))
        if resumed is None:
            raise CommandError(
                f"Rollout #{rollout.pk} is {rollout.status}: only a halted rollout can be resumed.",
                returncode=EXIT_USAGE,
            )
        self.stdout.write(f"Rollout #{resumed.pk} resumed: {resumed.status}.")
        if options["wait"]:
            resumed = wait_for(resumed, self.stderr, timeout=options["timeout"])
            self.stdout.write(rollouts.show_text(resumed))
            code = exit_code(resumed)
            if code:
                sys.exit(code)

    def _abort(self, options):
        rollout = self._rollout(options["id"])
        aborted = rollouts.do_abort_rollout(rollout, acting_user=self._user(options))
        if aborted is None:
            raise CommandError(
                f"Rollout #{rollout.pk} is already {rollout.status}.", returncode=EXIT_USAGE
            )
        self.stdout.write(f"Rollout #{aborted.pk} aborted. {aborted.note}")
