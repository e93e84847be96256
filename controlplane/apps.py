import gc
import logging
import sys

from django.apps import AppConfig

logger = logging.getLogger("controlplane")


class ControlPlaneConfig(AppConfig):
    name = "controlplane"
    verbose_name = "Control plane"

    def ready(self):
        # Registers the system checks; connects the failed-login counters.
        from controlplane import checks, throttling  # noqa: F401

        if sys.argv[1:2] == ["qcluster"]:
            preload_worker_modules()


def preload_worker_modules():
    """In ``manage.py qcluster``: import the migration task, what a run uses (verification,
    backups, the PostgreSQL and MySQL drivers and dialects), read the Alembic script directory
    with its revisions and compile env.py once, before django-q2 forks its workers, instead of
    in each worker on its first task (about 1.3 s of CPU per worker, again after every recycle;
    bench/README.md). The forked workers share those pages. Nothing is connected here: sockets
    must not cross a fork; what a forked worker must not share (threads, locks, engines, the
    Vault client) is dropped in each worker by ``migrator.process``'s after-fork hook.

    Logs the system check ``controlplane.W013`` again when the installed Alembic is outside the
    versions the control plane was tested on: into the workers' log, where a failed run is
    looked into."""
    try:
        from migrator import alembic_internals

        problem = alembic_internals.version_problem()
        if problem:
            logger.warning("%s", problem)

        from sqlalchemy.dialects import registry

        from migrator import (  # noqa: F401
            backups,
            phases,
            pipeline,
            rollback,
            runner,
            schema,
            tasks,
            verify,
        )

        for dialect in ("postgresql.psycopg", "mysql.pymysql"):
            registry.load(dialect).import_dbapi()
        runner.preload()
    except Exception:  # noqa: BLE001 - each run reports the problem on its own record
        logger.warning("Could not preload the migration engine in the cluster", exc_info=True)
    # What is loaded now lives as long as the workers: out of the garbage collector's sight, a
    # full collection in a worker looks at its own objects only (3 ms instead of 40 here), and
    # does not write to the pages the workers share with this process.
    gc.collect()
    gc.freeze()
