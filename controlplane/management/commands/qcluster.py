"""``manage.py qcluster``: django-q2's worker cluster, stopped gracefully, and recovering.

django-q2's own command has three problems this one removes (issue 17):

* SIGTERM or SIGINT sent to the cluster's process group (what systemd and a terminal's Ctrl-C
  send) killed the sentinel, the pusher and the workers at once, losing the tasks the pusher had
  taken and abandoning the running migrations, and the main process deadlocked: its handler set
  a multiprocessing ``Event`` (``Cluster.stop``) whose waiters had just died. Here only the main
  process acts on those signals, outside the handler: the sentinel and its children ignore them,
  the pusher stops taking tasks, the tasks it took and no worker started are handed back to the
  broker, the workers finish their runs, and the process exits.
* The stale-run recovery was a django-q2 schedule, queued behind the migrations it should watch
  over: it waited as long as they ran. Here the main process, idle while the cluster runs,
  recovers the runs of this cluster's regions itself every ``RUN_HEARTBEAT_SECONDS``, and steps
  the rollouts in progress on (``tenants.rollouts.advance_active``).
* A worker that died without recording anything (``os._exit()``, a segfault, SIGKILL) left its
  run silent until its heartbeats were missed. The sentinel knows how each worker ended: it
  writes that on the worker's running run and marks it silent, so the next recovery closes it
  at once, saying what happened.
"""

import logging
import os
import signal
import socket
import threading
import time
from datetime import UTC, datetime
from queue import Empty

from django.db import connections
from django.utils import timezone
from django_q.brokers.orm import ORM
from django_q.cluster import Cluster, Sentinel
from django_q.conf import Conf
from django_q.management.commands.qcluster import Command as DjangoQCommand
from django_q.signing import SignedPackage

logger = logging.getLogger("controlplane.qcluster")

_LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def how_it_ended(exitcode):
    """What a worker's exit code says about how it died, in words."""
    if exitcode is None:
        return "ended in an unknown way"
    if exitcode < 0:
        number = -exitcode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        cause = {
            "SIGSEGV": "a crash in a database driver or another C extension",
            "SIGBUS": "a crash in a database driver or another C extension",
            "SIGABRT": "an abort() in a C library",
            "SIGKILL": "`kill -9`, or the kernel's out-of-memory killer",
            "SIGTERM": "somebody sent it SIGTERM",
        }.get(name, "a signal sent to it")
        return f"was killed by {name} ({cause})"
    return (
        f"exited with status {exitcode} without recording an outcome (os._exit() in a "
        "revision or in a library it calls?)"
    )


def note_worker_death(pid, exitcode):
    """Write on the running run of the dead worker ``pid`` how it ended, and make it silent so
    the next recovery closes it at once (the database released its lock with its connection)."""
    from tenants.models import MigrationRun, RunStatus

    host = f"{socket.gethostname()}:{pid}"
    note = f"The worker process {host} {how_it_ended(exitcode)}."
    try:
        marked = MigrationRun.objects.filter(status=RunStatus.RUNNING, worker_host=host).update(
            error=note, heartbeat_at=_LONG_AGO
        )
    except Exception:  # noqa: BLE001 - the guard loop must go on; recovery still finds the run
        logger.warning("Could not record the death of worker %s", host, exc_info=True)
        return
    finally:
        connections.close_all()  # the sentinel forks the next worker right after
    if marked:
        logger.error("%s Its run is closed by the next recovery.", note)


class GracefulSentinel(Sentinel):
    """django-q2's sentinel, deaf to the group's SIGTERM and SIGINT (the main process stops it
    in order), handing back on stop what the pusher took and no worker started."""

    def __init__(self, *args, **kwargs):
        start = kwargs.pop("start", True)
        super().__init__(*args, start=False, **kwargs)
        # Sentinel.__init__ ignores SIGINT and restores SIGTERM's default; both are for the
        # main process. The pusher, monitor and workers forked from here inherit this.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if start:
            self.start()

    def reincarnate(self, process):
        if process in self.pool and process.timer.value == 0:
            # A worker past its task timeout ignores SIGTERM too (see above): end it for sure.
            process.join(1)
            if process.is_alive():
                process.kill()
                process.join(5)
        elif process in self.pool and process.timer.value != -2:
            note_worker_death(process.pid, process.exitcode)
        super().reincarnate(process)

    def stop(self):
        self.event_out.set()
        while self.pusher.is_alive():
            time.sleep(0.1)
        self.hand_back()
        super().stop()

    def hand_back(self):
        """Give the broker back the tasks the pusher took that no worker has started: another
        cluster (or this one's next start) takes them at once."""
        tasks = []
        while True:
            try:
                tasks.append(self.task_queue.get(timeout=0.2))
            except Empty:
                break
        if not tasks:
            return
        from django_q.models import OrmQ

        for task in tasks:
            ack_id = task.pop("ack_id", None)
            if isinstance(self.broker, ORM):
                # Still in the table, locked for Q_CLUSTER's retry: unlock it.
                OrmQ.objects.using(Conf.ORM).filter(pk=ack_id).update(lock=timezone.now())
            else:
                # Redis popped it: push it again.
                self.broker.enqueue(SignedPackage.dumps(task))
        connections.close_all()
        logger.warning("Handed %s task(s) back to the queue on stopping", len(tasks))


class GracefulCluster(Cluster):
    """django-q2's cluster whose main process notes SIGTERM and SIGINT in the handler and
    stops the cluster from its loop, and recovers its regions' runs meanwhile."""

    def __init__(self, *args, **kwargs):
        self.stop_signal = None
        super().__init__(*args, **kwargs)

    def sig_handler(self, signum, frame):
        # Only a note: anything that takes a lock here (Event.set, logging) can deadlock with
        # the code the signal interrupted.
        self.stop_signal = signum

    def start(self):
        if Conf.SYNC:
            return super().start()
        from django_q import cluster as django_q_cluster

        # Cluster.start forks the sentinel from the class that module names.
        original, django_q_cluster.Sentinel = django_q_cluster.Sentinel, GracefulSentinel
        try:
            return super().start()
        finally:
            django_q_cluster.Sentinel = original

    def run(self):
        """Start the cluster; recover every RUN_HEARTBEAT_SECONDS until a signal comes or the
        sentinel dies; then stop in order."""
        from django.conf import settings

        self.start()
        recovery, next_recovery = None, time.monotonic()
        while self.stop_signal is None and self.sentinel.is_alive():
            if time.monotonic() >= next_recovery and not (recovery and recovery.is_alive()):
                recovery = threading.Thread(target=recover_here, name="recovery", daemon=True)
                recovery.start()
                next_recovery = time.monotonic() + settings.RUN_HEARTBEAT_SECONDS
            time.sleep(0.2)
        if self.stop_signal is not None:
            logger.info(
                "%s: stopping; the workers finish their runs, tasks not started go back to the "
                "queue",
                signal.Signals(self.stop_signal).name,
            )
        self.stop()
        if recovery is not None:
            recovery.join(30)


def recover_here():
    """Recover the runs of the regions this cluster serves (``migrator.tasks``)."""
    from django.conf import settings

    from migrator.tasks import recover_stale_runs
    from tenants import rollouts, routing

    regions = None
    if settings.REGION_CLUSTERS:
        mine = routing.current_cluster()
        regions = [r for r, c in settings.REGION_CLUSTERS.items() if c == mine]
    try:
        for line in recover_stale_runs(regions=regions):
            logger.warning("%s", line)
    except Exception:  # noqa: BLE001 - the next pass tries again
        logger.exception("Recovery failed")
    from tenants.actions import reconcile_with_current_heads

    # A revision deployed while the cluster runs: its targets show behind within a pass.
    reconcile_with_current_heads()
    try:
        # Rollouts move on here too: bake times end and windows open without a run finishing.
        rollouts.advance_active()
    except Exception:  # noqa: BLE001 - the next pass tries again
        logger.exception("Advancing rollouts failed")
    finally:
        connections.close_all()


class Command(DjangoQCommand):
    help = (
        "Start a django-q2 worker cluster that stops gracefully on SIGTERM or SIGINT (the "
        "workers finish their runs; tasks not started go back to the queue) and recovers its "
        "regions' stale and abandoned runs every RUN_HEARTBEAT_SECONDS."
    )

    def handle(self, *args, **options):
        from django.conf import settings

        settings.SECRET_KEY  # noqa: B018 - signing needs it; fail now, not at the first task
        if options.get("cluster_name"):
            os.environ["Q_CLUSTER_NAME"] = options["cluster_name"]
        cluster = GracefulCluster()
        if options.get("run_once"):
            cluster.start()
            cluster.stop()
            return
        cluster.run()
