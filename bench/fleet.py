"""Fleet benchmark: the product path against the raw-DDL floor and the shell-loop baseline.

One command, ``python bench/fleet.py`` (or ``make bench``); see bench/README.md. It builds a
throw-away fleet on the local servers, measures, prints a table, writes JSON to bench/results/
and drops everything it made, also on Ctrl-C:

* N tenant databases on PostgreSQL (and on MariaDB with ``--mysql``), each with its own admin
  user, their secrets in a real OpenBao dev server, registered in a throw-away control plane
  (a SQLite file in a temp dir, or a PostgreSQL database with ``--control-db postgres``);
* product: ``manage.py migrate_tenants --all --wait`` through a real ``manage.py qcluster``
  with W workers, from enqueue until every run is recorded;
* floor: the same DDL (Alembic's offline SQL) run with the bare driver by W processes, one
  connection per database, on fresh databases, right before each product variant and after the
  last; each variant is compared with the mean of the floors around it;
* shell loop: ``alembic -x url=... upgrade head``, one process per tenant, W at a time, on a
  sample of fresh databases;
* no-op: the product path again with every target already at head, and the same with
  ``--skip-at-head`` (the record trusted, no database read);
* memory: VmHWM / VmRSS of each qcluster worker at start and end, and the RSS of one process
  running ``run_migration`` for ``--memory-runs`` consecutive real migrations.

With ``--hosts H`` (root, Linux) the workers run as H ``qcluster`` processes, W/H workers each,
on H worker hosts of their own: network namespaces with their own host names that reach the
control plane's database, Redis, OpenBao and the tenant databases only over their veth links,
through a forwarder in the root namespace (tests/netns.py). The floors still connect directly.
"""

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PREFIX = "fleetbench"
PYTHON = sys.executable

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from controlplane import devservices  # noqa: E402 - needs ROOT on sys.path


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parallel(function, items, threads):
    """``[function(item) for item in items]`` on ``threads`` threads; on Ctrl-C (or an error)
    the items not started yet are dropped, so the cleanup does not wait for them."""
    pool = ThreadPoolExecutor(threads)
    try:
        return list(pool.map(function, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --- Servers ------------------------------------------------------------------------------------


class Fleet:
    """What the bench adds to a server of ``controlplane.devservices``: N databases made or
    dropped on a few threads, each with one user as its admin and app user."""

    def create(self, names, threads=4):
        def make(name):
            return self.create_database(name, admin_username=name, app_username=name)

        return parallel(make, names, threads)

    def drop(self, dbs, threads=4):
        """Drop these databases and their users now."""
        parallel(self.drop_database, dbs, threads)


class PostgresFleet(Fleet, devservices.PostgresServer):
    """The local PostgreSQL. Roles join ``tm_password_checked`` (devservices): where pg_hba.conf
    has the rule for it, each login really checks its SCRAM password, as in production."""

    def checkpoint(self):
        """Write out what earlier phases dirtied, so a phase does not pay for the one before;
        and vacuum the shared catalogs, which every phase's thousand new and dropped databases
        and roles leave full of dead rows that autovacuum does not visit (every login reads
        them: 20,000 dead rows in pg_authid after a day of runs here)."""
        with self.connect() as conn:
            conn.execute(
                "VACUUM pg_catalog.pg_authid, pg_catalog.pg_auth_members, "
                "pg_catalog.pg_database, pg_catalog.pg_shdepend"
            )
            conn.execute("CHECKPOINT")

    def create_plain_database(self, name):
        """A database for the control plane itself, owned by the superuser."""
        from psycopg import sql

        with self.connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        auth = self.user + (f":{self.password}" if self.password else "")
        return f"postgres://{auth}@{self.host}:{self.port}/{name}"


class MySQLFleet(Fleet, devservices.MySQLServer):
    """The local MariaDB/MySQL."""


def stop_process(process, *, group=False, timeout=20):
    """SIGTERM ``process`` (its whole session with ``group``), SIGKILL after ``timeout``."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(process.pid, signal.SIGTERM)
        else:
            process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# --- Process memory -----------------------------------------------------------------------------


def proc_memory(pid):
    """``{"hwm_kb": VmHWM, "rss_kb": VmRSS}`` of a live process, from /proc/<pid>/status."""
    values = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(("VmHWM:", "VmRSS:")):
                    key = "hwm_kb" if line.startswith("VmHWM") else "rss_kb"
                    values[key] = int(line.split()[1])
    except FileNotFoundError:
        return None
    return values


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _processes():
    """``{pid: (ppid, comm, cpu seconds)}`` of every process; cpu includes reaped children."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        # fields[1] is ppid; utime, stime, cutime, cstime are fields 14-17 of stat (11-14 here).
        cpu = sum(int(x) for x in fields[11:15]) / _CLOCK_TICKS
        table[int(entry)] = (int(fields[1]), comm, cpu)
    return table


def cpu_snapshot(roots):
    """CPU seconds used so far by each process tree in ``roots`` ({label: pid}), and by the
    servers found by name (postgres, mariadbd, redis-server), children included."""
    table = _processes()
    kids = {}
    for pid, (ppid, _, _) in table.items():
        kids.setdefault(ppid, []).append(pid)

    def tree(root):
        total, stack = 0.0, [root]
        while stack:
            pid = stack.pop()
            if pid in table:
                total += table[pid][2]
                stack.extend(kids.get(pid, ()))
        return total

    snapshot = {
        label: sum(tree(p) for p in (pid if isinstance(pid, list) else [pid]))
        for label, pid in roots.items()
        if pid
    }
    servers = (("postgres", "postgres"), ("mariadb", "mariadbd"), ("redis", "redis-server"))
    for label, name in servers:
        tops = [
            pid
            for pid, (ppid, comm, _) in table.items()
            if comm == name and table.get(ppid, (0, ""))[1] != name
        ]
        if tops:
            snapshot[label] = sum(tree(pid) for pid in tops)
    usage = __import__("resource").getrusage(__import__("resource").RUSAGE_CHILDREN)
    snapshot["commands"] = usage.ru_utime + usage.ru_stime  # finished children (manage.py ...)
    snapshot["bench"] = sum(os.times()[:2])
    return snapshot


def cpu_delta(before, after, count):
    """CPU milliseconds per tenant by component between two snapshots."""
    return {
        label: round((after[label] - before.get(label, 0.0)) * 1000 / count, 2) for label in after
    }


# --- The control plane --------------------------------------------------------------------------


class ControlPlane:
    """A throw-away control plane: its database, its environment, its qcluster."""

    def __init__(self, workdir, vault, *, workers, database_url, broker_url=None):
        self.workdir = Path(workdir)
        self.cluster_name = f"{PREFIX}-{secrets.token_hex(3)}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "Q_"))},
            "DJANGO_SETTINGS_MODULE": "controlplane.settings",
            "SECRET_KEY": secrets.token_urlsafe(40),
            "DEBUG": "false",
            "DATA_DIR": str(self.workdir),
            "DATABASE_URL": database_url,
            "VAULT_ADDR": vault.addr,
            "VAULT_TOKEN": vault.root_token,
            "VAULT_AUTH_METHOD": "token",
            "TENANT_MIGRATIONS_DIR": str(ROOT / "tenant_migrations"),
            "Q_WORKERS": str(workers),
            "Q_CLUSTER_NAME": self.cluster_name,
            "PYTHONPATH": str(ROOT),
        }
        self.env.pop("REDIS_URL", None)
        if broker_url:
            self.env["REDIS_URL"] = broker_url
        self.workers = workers
        self.cluster = None
        self.cluster_log = self.workdir / "qcluster.log"
        self.hosts = []  # tests.netns.WorkerHost: one qcluster on each, workers split among them

    def setup_django(self):
        """Configure Django in this process on the throw-away control plane."""
        os.environ.update(self.env)
        import django

        django.setup()

    def manage(self, *args, check=True, timeout=None):
        started = time.perf_counter()
        result = subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        elapsed = time.perf_counter() - started
        if check and result.returncode not in (0,):
            raise RuntimeError(
                f"manage.py {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result, elapsed

    def start_cluster(self, extra_env=None, timeout=60):
        self.cluster_log.write_bytes(b"")  # worker pids are read from this cluster's lines
        if self.hosts:
            env = {**self.env, **(extra_env or {})}
            env["Q_WORKERS"] = str(self.workers // len(self.hosts))
            self.cluster = [
                host.popen([PYTHON, "manage.py", "qcluster"], env=env, log_path=self.cluster_log)
                for host in self.hosts
            ]
            return self.wait_for_workers(timeout)
        self.cluster = subprocess.Popen(
            [PYTHON, "manage.py", "qcluster"],
            cwd=ROOT,
            env={**self.env, **(extra_env or {})},
            stdout=open(self.cluster_log, "ab"),  # noqa: SIM115 - closed with the process
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self.wait_for_workers(timeout)

    def wait_for_workers(self, timeout):
        """The pids of the workers once they all started (and a monitor and a pusher)."""
        clusters = self.cluster if isinstance(self.cluster, list) else [self.cluster]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(cluster.poll() is not None for cluster in clusters):
                raise RuntimeError(f"qcluster exited; see {self.cluster_log}")
            pids = self.worker_pids()
            helpers = self.worker_pids("monitoring") and self.worker_pids("pushing tasks")
            if len(pids) >= self.workers and helpers:
                return pids
            time.sleep(0.1)
        raise RuntimeError(f"qcluster workers did not start in {timeout}s; see {self.cluster_log}")

    def worker_pids(self, role="ready for work"):
        """Live pids of the cluster's workers (or of its "monitoring" or "pushing tasks"
        process), from the cluster's "ready for work at PID" (...) log lines."""
        try:
            text = self.cluster_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        pids = [int(p) for p in re.findall(rf"{role} at (\d+)", text)]
        return [pid for pid in pids if Path(f"/proc/{pid}").exists()]

    def stop_cluster(self):
        # The main process stops its own workers; signalling the group at once makes the
        # sentinel wait for children that are already gone.
        if self.hosts:
            for host in self.hosts:
                host.terminate()
            for host in self.hosts:
                host.stop_processes()
        else:
            stop_process(self.cluster)
        self.cluster = None


# --- Measurements -------------------------------------------------------------------------------


NOOP_STATEMENT = "SELECT version_num FROM alembic_version"
VARIANT_CODES = {"product": "p", "product_noverify": "q"}


def ddl_statements(provider):
    """Alembic's offline SQL from base to head for ``provider``, as a list of statements."""
    from migrator.runner import sql_preview

    return split_sql(sql_preview(provider, None, "head").sql)


def split_sql(sql):
    """Statements of an SQL script, split at semicolons outside quotes, dollar-quoted bodies
    (PostgreSQL functions) and comments; comment-only chunks are dropped."""
    statements, current, i = [], [], 0
    while i < len(sql):
        char = sql[i]
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = len(sql) if end < 0 else end
            continue
        if char in "'\"":
            end = sql.find(char, i + 1)
            end = len(sql) - 1 if end < 0 else end
            current.append(sql[i : end + 1])
            i = end + 1
            continue
        tag = re.match(r"\$[A-Za-z_]*\$", sql[i:])
        if tag:
            end = sql.find(tag.group(), i + len(tag.group()))
            end = len(sql) if end < 0 else end + len(tag.group())
            current.append(sql[i:end])
            i = end
            continue
        if char == ";":
            statement = "".join(current).strip()
            if statement:
                statements.append(statement)
            current = []
        else:
            current.append(char)
        i += 1
    statement = "".join(current).strip()
    if statement:
        statements.append(statement)
    return statements


def _floor_one(args):
    """Run the DDL on one database with the bare driver; returns milliseconds (child process)."""
    db, statements = args
    started = time.perf_counter()
    if db["provider"] == "postgresql":
        import psycopg

        with psycopg.connect(
            host=db["host"],
            port=db["port"],
            user=db["admin_username"],
            password=db["admin_password"],
            dbname=db["database"],
            autocommit=True,
        ) as conn:
            for statement in statements:
                conn.execute(statement)
    else:
        import pymysql

        conn = pymysql.connect(
            host=db["host"],
            port=db["port"],
            user=db["admin_username"],
            password=db["admin_password"],
            database=db["database"],
            autocommit=True,
            # PyMySQL's default ("preferred" TLS) builds a TLS context for every connection,
            # about 20 ms of CPU, before finding that the local server offers no TLS; the
            # product builds it once per worker (migrator/providers/mysql.py). The floor, the
            # cheapest client, asks for none.
            ssl_disabled=True,
        )
        try:
            with conn.cursor() as cur:
                for statement in statements:
                    cur.execute(statement)
        finally:
            conn.close()
    return (time.perf_counter() - started) * 1000


def _child_signals():
    # Pool processes take the default SIGTERM (the pool ends them with it) and leave Ctrl-C to
    # the parent, which cleans up.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _warm(_):
    import psycopg  # noqa: F401
    import pymysql  # noqa: F401

    return os.getpid()


def measure_floor(databases, statements, workers, roots):
    import multiprocessing

    pool = multiprocessing.get_context("fork").Pool(workers, initializer=_child_signals)
    try:
        pool.map(_warm, range(workers * 2))  # imports done before the clock starts
        cpu_before = cpu_snapshot(roots)
        started = time.perf_counter()
        durations = pool.map(
            _floor_one, [(dataclasses.asdict(db), statements) for db in databases], chunksize=1
        )
        wall = time.perf_counter() - started
        pool.close()
        pool.join()  # reaped: their CPU time counts under "commands"
    finally:
        pool.terminate()
    cpu = cpu_delta(cpu_before, cpu_snapshot(roots), len(databases))
    return {
        "cpu_ms_per_tenant": cpu,
        "tenants": len(databases),
        "wall_s": wall,
        "ms_per_tenant": wall * 1000 / len(databases),
        "latency_ms": summarize(durations),
        "statements": len(statements),
    }


def measure_shell_loop(databases, workers, roots):
    """``alembic -x url=... upgrade head``: one process per tenant, ``workers`` at a time."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("DJANGO_SETTINGS_MODULE", None)

    def one(db):
        started = time.perf_counter()
        result = subprocess.run(
            # "heads": every branch head, as the product's "head" means for the expand/contract
            # pair (branch-labelled heads); the same as "head" for a linear chain.
            [
                str(Path(PYTHON).parent / "alembic"),
                "-x",
                f"url={db.sqlalchemy_url().render_as_string(hide_password=False)}",
                "upgrade",
                "heads",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode:
            raise RuntimeError(f"alembic failed on {db.database}: {result.stderr[-2000:]}")
        return (time.perf_counter() - started) * 1000

    cpu_before = cpu_snapshot(roots)
    started = time.perf_counter()
    durations = parallel(one, databases, workers)
    wall = time.perf_counter() - started
    return {
        "cpu_ms_per_tenant": cpu_delta(cpu_before, cpu_snapshot(roots), len(databases)),
        "tenants": len(databases),
        "wall_s": wall,
        "ms_per_tenant": wall * 1000 / len(databases),
        "latency_ms": summarize(durations),
        "per_tenant_ms": [round(d, 1) for d in durations],
    }


def measure_product(plane, provider, region, expect, count, roots):
    """``migrate_tenants --all --wait`` on the running cluster; times taken from the runs."""
    from django.db import connections
    from django.db.models import Max, Min

    from tenants.models import MigrationRun

    before = MigrationRun.objects.aggregate(Max("pk"))["pk__max"] or 0
    connections.close_all()
    cpu_before = cpu_snapshot(roots)
    started = time.perf_counter()
    result, _ = plane.manage(
        "migrate_tenants",
        "--all",
        "--provider",
        provider,
        "--region",
        region,
        "--wait",
        "--json",
        check=False,
    )
    command_wall = time.perf_counter() - started
    cpu = cpu_delta(cpu_before, cpu_snapshot(roots), count)
    runs = MigrationRun.objects.filter(pk__gt=before)
    statuses = {}
    for status in runs.values_list("status", flat=True):
        statuses[status] = statuses.get(status, 0) + 1
    if result.returncode or statuses.get(expect, 0) != count:
        raise RuntimeError(
            f"migrate_tenants exited {result.returncode} with {statuses} (expected {count} "
            f"{expect}):\n{result.stderr[-3000:]}"
        )
    span = runs.aggregate(
        first=Min("created_at"), started=Min("started_at"), last=Max("finished_at")
    )
    wall = (span["last"] - span["first"]).total_seconds()
    durations = [d for d in runs.values_list("duration_ms", flat=True) if d is not None]
    task_ms = [
        (finished - started_at).total_seconds() * 1000
        for started_at, finished in runs.values_list("started_at", "finished_at")
    ]
    queued_ms = [
        (started_at - created).total_seconds() * 1000
        for created, started_at in runs.values_list("created_at", "started_at")
    ]
    hosts = set(runs.values_list("worker_host", flat=True))
    connections.close_all()
    return {
        "tenants": count,
        "wall_s": wall,
        "ms_per_tenant": wall * 1000 / count,
        "command_wall_s": command_wall,
        # From the first run queued to the first one started: the queue's own latency.
        "first_start_ms": (span["started"] - span["first"]).total_seconds() * 1000,
        "cpu_ms_per_tenant": cpu,
        "statuses": statuses,
        "runner_ms": summarize(durations),
        "task_ms": summarize(task_ms),
        "queued_ms": summarize(queued_ms),
        "worker_pids": sorted(int(h.rsplit(":", 1)[1]) for h in hosts if ":" in h),
        # Runs per worker host name (with --hosts, one per network namespace).
        "runs_per_host": dict(
            Counter(h.rsplit(":", 1)[0] for h in runs.values_list("worker_host", flat=True))
        ),
    }


def measure_skip_at_head(plane, provider, region, count, roots):
    """``migrate_tenants --all --skip-at-head --wait`` with every target recorded at head: no
    database is read and no run queued. Timed as the whole command, Python start included."""
    cpu_before = cpu_snapshot(roots)
    started = time.perf_counter()
    result, _ = plane.manage(
        "migrate_tenants",
        "--all",
        "--provider",
        provider,
        "--region",
        region,
        "--wait",
        "--json",
        "--skip-at-head",
    )
    wall = time.perf_counter() - started
    statuses = {}
    for entry in json.loads(result.stdout):
        statuses[entry["status"]] = statuses.get(entry["status"], 0) + 1
    if statuses != {"recorded-at-head": count}:
        raise RuntimeError(f"--skip-at-head left {statuses}, expected {count} recorded-at-head")
    return {
        "tenants": count,
        "wall_s": wall,
        "ms_per_tenant": wall * 1000 / count,
        "cpu_ms_per_tenant": cpu_delta(cpu_before, cpu_snapshot(roots), count),
        "statuses": statuses,
        "command_ms": {"p50": round(wall * 1000, 1)},
    }


# --- Registered targets, no databases (--register) ---------------------------------------------


REGISTERED_REGION = "bench-registered"
# The pages an operator opens on a large fleet: (label, URL name, query string).
REGISTERED_PAGES = (
    ("dashboard", "fleet-dashboard", ""),
    ("targets changelist", "admin:tenants_migrationtarget_changelist", ""),
    ("runs changelist", "admin:tenants_migrationrun_changelist", ""),
    ("tenants changelist", "admin:tenants_tenant_changelist", ""),
    ("/metrics", "metrics", ""),
    ("/readyz", "readyz", "?format=json"),
)


def register_targets(count):
    """``count`` dedicated tenants, each with a target of its own, in the control plane only:
    no database, no secret behind them (nothing here ever connects to one)."""
    from django.db import connections

    from tenants.models import MigrationTarget, Tenant

    started = time.perf_counter()
    names = [f"registered-{i:05d}" for i in range(count)]
    targets = MigrationTarget.objects.bulk_create(
        (
            MigrationTarget(
                name=name,
                kind="dedicated",
                provider="postgresql",
                vault_path=name,
                region=REGISTERED_REGION,
            )
            for name in names
        ),
        batch_size=500,
    )
    Tenant.objects.bulk_create(
        (Tenant(id=t.name, name=t.name, strategy="dedicated", target=t) for t in targets),
        batch_size=500,
    )
    connections.close_all()
    return time.perf_counter() - started


def queued_messages(plane):
    """How many task messages wait in the cluster's queue: its Redis list, or its OrmQ rows."""
    from django_q.brokers import get_broker
    from django_q.conf import Conf
    from django_q.models import OrmQ

    if plane.env.get("REDIS_URL"):
        return get_broker(plane.cluster_name).queue_size()
    return OrmQ.objects.using(Conf.ORM).filter(key=plane.cluster_name).count()


def measure_pages(repeat=5):
    """Each of ``REGISTERED_PAGES`` through Django's test client, as a superuser: its status,
    the queries of the request's own thread (as ``django_assert_max_num_queries`` counts them;
    /readyz runs its two checks on threads of their own) and the wall time of each request,
    the first one apart (it fills the per-process caches)."""
    from django.contrib.auth import get_user_model
    from django.db import connection, connections
    from django.test import Client
    from django.test.utils import CaptureQueriesContext, override_settings
    from django.urls import reverse

    user, _ = get_user_model().objects.get_or_create(
        username="bench-admin", defaults={"is_staff": True, "is_superuser": True}
    )
    client = Client()
    client.force_login(user)
    pages = {}
    with override_settings(ALLOWED_HOSTS=["testserver"]):
        for label, name, query in REGISTERED_PAGES:
            url = reverse(name) + query
            times, counts, status = [], [], None
            for _ in range(1 + repeat):
                with CaptureQueriesContext(connection) as queries:
                    started = time.perf_counter()
                    response = client.get(url)
                    times.append((time.perf_counter() - started) * 1000)
                status = response.status_code
                counts.append(len(queries.captured_queries))
            pages[label] = {
                "url": url,
                "status": status,
                "queries": counts[-1],
                "queries_first": counts[0],
                "first_ms": round(times[0], 1),
                "ms": summarize(times[1:]),
            }
    connections.close_all()
    return pages


def measure_registered(plane, count, roots):
    """``--register``: ``count`` targets registered without databases; the pages at that size;
    then ``manage.py migrate_tenants --all`` timed from the command's start to its exit, with
    no worker running, so every run it creates stays queued (checked: ``count`` queued runs, and
    as many messages in the cluster's queue); then the pages again, each target with a queued
    run. The runs and messages are dropped after."""
    from django.db import connections

    from tenants.models import MigrationRun

    log(f"Registering {count} targets (and a tenant each) without databases ...")
    result = {"tenants": count, "register_s": round(register_targets(count), 2)}
    log(f"  done in {result['register_s']}s; the pages at {count} targets ...")
    result["pages_before"] = measure_pages()
    log(f"migrate_tenants --all: queueing {count} runs, no worker running ...")
    cpu_before = cpu_snapshot(roots)
    command, wall = plane.manage("migrate_tenants", "--all")
    cpu = cpu_delta(cpu_before, cpu_snapshot(roots), 1)
    queued = MigrationRun.objects.filter(status="queued").count()
    messages = queued_messages(plane)
    connections.close_all()
    if queued != count or messages != count:
        raise RuntimeError(
            f"migrate_tenants --all left {queued} run(s) queued and {messages} message(s) in "
            f"the queue, expected {count}:\n{command.stderr[-3000:]}"
        )
    result["queue"] = {
        "command": "manage.py migrate_tenants --all",
        "wall_s": round(wall, 3),
        "command_cpu_s": round(cpu.get("commands", 0) / 1000, 3),
        # The servers' CPU meanwhile (shared: whatever else ran on them is in it too).
        "server_cpu_s": {k: round(cpu[k] / 1000, 3) for k in ("postgres", "redis") if k in cpu},
        "runs_queued": queued,
        "messages_queued": messages,
    }
    log(f"  {wall:.2f}s from start to exit")
    result["pages_after"] = measure_pages()
    clear_queue(plane)
    return result


def clear_queue(plane):
    """Drop the runs and the queue messages ``--register`` made (no worker will take them)."""
    from django.db import connections
    from django_q.brokers import get_broker

    from tenants.models import MigrationRun

    get_broker(plane.cluster_name).delete_queue()
    MigrationRun.objects.all().delete()
    connections.close_all()


def summarize(values):
    if not values:
        return {}
    values = sorted(values)
    return {
        "mean": round(statistics.fmean(values), 2),
        "p50": round(values[len(values) // 2], 2),
        "p95": round(values[min(len(values) - 1, int(len(values) * 0.95))], 2),
        "max": round(values[-1], 2),
    }


def memory_child(runs, region):
    """In this process: ``run_migration`` on ``runs`` consecutive runs over every registered
    target, alternating downgrade to base and upgrade to head so each run does real DDL. Prints
    JSON: RSS after each hundredth run. Used by the memory phase (``fleet.py _memory``)."""
    import django

    django.setup()
    from migrator import tasks
    from tenants import actions
    from tenants.models import MigrationTarget, RunKind, Trigger

    profile = None
    if os.environ.get("BENCH_PROFILE"):
        import cProfile

        # CPU time, not wall: the machine is shared, and waits are not the workers' cost.
        profile = cProfile.Profile(time.process_time)
    targets = list(
        MigrationTarget.objects.filter(provider="postgresql", region=region).order_by("name")
    )
    phases = _time_phases() if profile else {"on": False}
    samples = []
    done = 0
    kind = RunKind.DOWNGRADE
    started = time.perf_counter()
    cpu_started = time.process_time()
    while done < runs:
        batch = targets[: runs - done]
        revision = "base" if kind == RunKind.DOWNGRADE else "head"
        dispatches = actions.do_enqueue_runs(
            batch, trigger=Trigger.COMMAND, revision=revision, kind=kind, enqueue=False
        )
        for dispatch in dispatches:
            # Only the upgrades are profiled, as in production: an upgrade of a database at
            # base to head, with the verification of the default settings.
            # Every other upgrade is profiled; the others are timed by phase, without the
            # profiler's own cost.
            upgrade = profile and kind == RunKind.UPGRADE
            profiled = upgrade and done % 2 == 0
            if profiled:
                profile.enable()
            phases["on"] = upgrade and not profiled
            outcome = tasks.run_migration(dispatch.run.pk)
            phases["on"] = False
            if profiled:
                profile.disable()
            if outcome.get("status") not in ("succeeded", "skipped"):
                raise RuntimeError(f"run {dispatch.run.pk}: {outcome}")
            done += 1
            if done in (1, 10) or done % 100 == 0 or done == runs:
                samples.append({"runs": done, **proc_memory(os.getpid())})
        kind = RunKind.UPGRADE if kind == RunKind.DOWNGRADE else RunKind.DOWNGRADE
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    if profile:
        profile.dump_stats(os.environ["BENCH_PROFILE"])
    report = {"runs": done, "seconds": elapsed, "cpu_seconds": cpu, "samples": samples}
    if profile:
        upgrades = phases["run_migration"][1] or 1
        del phases["on"]
        report["phase_cpu_ms_per_upgrade"] = {
            name: round(spent * 1000 / upgrades, 3) for name, (spent, _) in phases.items()
        }
    print(json.dumps(report))


def _time_phases():
    """Wrap the parts of a run with CPU-time counters (process_time, inclusive); returns
    {name: [seconds, calls]}, counted while its "on" is true."""
    from migrator import pipeline, runner, secrets, tasks, verify
    from tenants import actions

    phases = {"on": False}

    def wrap(owner, name, label):
        original = getattr(owner, name)
        phases[label] = [0.0, 0]

        def timed(*args, **kwargs):
            if not phases["on"]:
                return original(*args, **kwargs)
            started = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                phases[label][0] += time.process_time() - started
                phases[label][1] += 1

        setattr(owner, name, timed)

    wrap(tasks, "run_migration", "run_migration")
    wrap(actions, "do_start_run", "do_start_run")
    wrap(actions, "do_record_run_outcome", "do_record_run_outcome")
    wrap(pipeline, "run", "pipeline.run")
    wrap(secrets.SecretsManager, "_read_secret", "vault read")
    wrap(runner, "_apply", "runner._apply (lock, env.py, Alembic)")
    wrap(verify, "verify_after_upgrade", "verify_after_upgrade")
    return phases


def measure_memory(plane, runs, region, profile_path=None):
    env = dict(plane.env)
    if profile_path:
        env["BENCH_PROFILE"] = str(profile_path)
    result = subprocess.run(
        [PYTHON, str(Path(__file__).resolve()), "_memory", "--runs", str(runs), "--region", region],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode:
        raise RuntimeError(f"memory phase failed:\n{result.stderr[-3000:]}")
    data = json.loads(result.stdout.strip().splitlines()[-1])
    samples = data["samples"]
    warm = next(s for s in samples if s["runs"] == min(10, data["runs"]))
    last = samples[-1]
    data["warm_rss_kb"] = warm["rss_kb"]
    data["end_rss_kb"] = last["rss_kb"]
    data["growth_pct"] = round((last["rss_kb"] - warm["rss_kb"]) * 100 / warm["rss_kb"], 2)
    data["ms_per_run"] = round(data["seconds"] * 1000 / data["runs"], 2)
    data["cpu_ms_per_run"] = round(data["cpu_seconds"] * 1000 / data["runs"], 2)
    for name, ms in data.get("phase_cpu_ms_per_upgrade", {}).items():
        log(f"  {name}: {ms} ms of CPU per upgrade")
    return data


# --- The run ------------------------------------------------------------------------------------


class Bench:
    def __init__(self, options):
        self.options = options
        self.run_id = secrets.token_hex(3)
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}-"))
        self.servers = {"postgresql": PostgresFleet(options.postgres_url)}
        if options.mysql:
            self.servers["mysql"] = MySQLFleet(options.mysql_url)
        self.vault = None
        self.plane = None
        self.service = None  # with --hosts: the services' address over the hosts' links
        self.hosts = []
        self.results = {}

    def name(self, provider, group, index):
        short = {"postgresql": "pg", "mysql": "my"}[provider]
        return f"{PREFIX}_{self.run_id}_{short}{group}{index:04d}"

    def run(self):
        o = self.options
        log(
            f"Work directory {self.workdir}; N={o.tenants}, W={o.workers}, "
            f"control db {o.control_db}, broker {o.broker}"
        )
        for server in self.servers.values():
            server.ping()
        if o.broker == "redis":
            devservices.ping_redis(o.redis_url)
        self.vault = devservices.OpenBaoServer(log_path=self.workdir / "openbao.log").start()
        variants = self.variants()
        if o.control_db == "postgres":
            database_url = self.servers["postgresql"].create_plain_database(
                f"{PREFIX}_{self.run_id}_control"
            )
        else:
            database_url = f"sqlite:///{self.workdir / 'controlplane.sqlite3'}"
        broker_url = o.redis_url if o.broker == "redis" else None
        if o.hosts:
            database_url, broker_url = self.start_hosts(database_url, broker_url)
        self.plane = ControlPlane(
            self.workdir,
            self.vault,
            workers=o.workers,
            database_url=database_url,
            broker_url=broker_url,
        )
        if o.hosts:
            self.plane.env["VAULT_ADDR"] = self.service.url(self.vault.addr)
            self.plane.workers = o.workers // o.hosts * o.hosts
            self.plane.hosts = self.hosts
        log("Migrating the control-plane database ...")
        self.plane.manage("migrate", "--noinput")
        self.plane.setup_django()
        if o.register:
            self.report_registered(measure_registered(self.plane, o.register, self.roots()))
            return
        statements = {p: ddl_statements(p) for p in self.servers}

        # Each phase gets N fresh databases, made just before it and dropped after it: the
        # server holds one fleet at a time, as it would in production (four fleets of a thousand
        # template copies no longer fit in the page cache, and every phase then waited on disk).
        # This VM's speed drifts by a third within an hour, so the floor is measured right before
        # each product variant and once after the last: each variant is compared with the mean
        # of the two floors around it, taken minutes apart from it, not hours.
        self.measure_floors(statements)
        memory_targets = None
        for variant, extra_env in variants.items():
            region = self.region(variant)
            fleets = {
                provider: self.fresh(provider, VARIANT_CODES[variant]) for provider in self.servers
            }
            self.register(fleets, region)
            log(f"Starting qcluster with {o.workers} workers ({variant}) ...")
            pids = self.plane.start_cluster(extra_env)
            memory_start = {pid: proc_memory(pid) for pid in pids}
            for provider in self.servers:
                result = self.results[provider]
                log(
                    f"[{provider}] {variant}: migrate_tenants --all --region {region} --wait "
                    f"on {o.tenants} targets ..."
                )
                self.quiesce()
                result[variant] = measure_product(
                    self.plane, provider, region, "succeeded", o.tenants, self.roots()
                )
                log(
                    f"  {result[variant]['ms_per_tenant']:.1f} ms/tenant; runs per host: "
                    f"{result[variant]['runs_per_host']}"
                )
                if variant == "product":
                    log(f"[{provider}] no-op: the same, every target at head ...")
                    self.quiesce()
                    result["noop"] = measure_product(
                        self.plane, provider, region, "skipped", o.tenants, self.roots()
                    )
                    log(f"  {result['noop']['ms_per_tenant']:.2f} ms/tenant")
                    log(f"[{provider}] no-op, --skip-at-head: the record trusted, nothing read ...")
                    self.quiesce()
                    result["noop_recorded"] = measure_skip_at_head(
                        self.plane, provider, region, o.tenants, self.roots()
                    )
                    log(f"  {result['noop_recorded']['ms_per_tenant']:.2f} ms/tenant")
            live = self.plane.worker_pids()
            memory_end = {pid: proc_memory(pid) for pid in live}
            self.plane.stop_cluster()
            self.results.setdefault("qcluster_memory", {})[variant] = {
                "start": {str(k): v for k, v in memory_start.items()},
                "end": {str(k): v for k, v in memory_end.items()},
                "recycled": sorted(set(memory_start) - set(live)),
            }
            # The last fleet stays for the memory phase.
            if memory_targets is not None:
                for provider, dbs in memory_targets[1].items():
                    self.servers[provider].drop(dbs)
            memory_targets = (region, fleets)
            self.measure_floors(statements)
        for provider in self.servers:
            self.pair_floors(self.results[provider], list(variants))

        for provider in self.servers:
            sample = min(o.sample, o.tenants)
            if not sample:
                continue
            shell = self.fresh(provider, "s", sample)
            log(
                f"[{provider}] shell loop: alembic upgrade heads, one process per tenant, "
                f"{sample} tenants, {o.workers} at a time ..."
            )
            self.quiesce()
            self.results[provider]["shell"] = measure_shell_loop(shell, o.workers, self.roots())
            log(f"  {self.results[provider]['shell']['latency_ms']['mean']:.0f} ms per process")
            self.servers[provider].drop(shell)

        if o.memory_runs and memory_targets is not None and "postgresql" in self.servers:
            log(f"Memory: {o.memory_runs} consecutive migrations in one process ...")
            self.results["memory"] = measure_memory(
                self.plane, o.memory_runs, memory_targets[0], o.profile
            )
            log(
                f"  RSS {self.results['memory']['warm_rss_kb']} kB after 10 runs, "
                f"{self.results['memory']['end_rss_kb']} kB after {o.memory_runs}"
            )
        self.report()

    def start_hosts(self, database_url, broker_url):
        """Make ``--hosts`` worker hosts and the services' address on their links; returns the
        control plane's database and broker URLs as the hosts reach them."""
        from urllib.parse import urlsplit

        from tests import netns

        o = self.options
        reason = netns.missing_capability()
        if reason:
            raise SystemExit(f"--hosts: {reason}")
        if o.workers < o.hosts:
            raise SystemExit("--hosts: at least one worker per host (-w)")
        ports = [self.vault.port, *(server.port for server in self.servers.values())]
        if broker_url:
            ports.append(urlsplit(broker_url).port or 6379)
        self.service = netns.ServiceAddress(ports, log_path=self.workdir / "forwarder.log")
        self.service.start()
        self.hosts = [
            netns.WorkerHost(self.service, index + 1, f"bench-host-{index + 1}").create()
            for index in range(o.hosts)
        ]
        log(
            f"{o.hosts} worker hosts ({o.workers // o.hosts} workers each) reaching the "
            f"services at {self.service.address} over their links"
        )
        return self.service.url(database_url), broker_url and self.service.url(broker_url)

    def measure_floors(self, statements):
        """The floor and the no-op floor on N fresh databases of each server, appended to
        ``floor_runs`` and ``noop_floor_runs`` (the no-op floor reads the databases the floor
        just migrated)."""
        o = self.options
        for provider in self.servers:
            result = self.results.setdefault(provider, {})
            runs = result.setdefault("floor_runs", [])
            floor = self.fresh(provider, f"f{len(runs)}")
            log(
                f"[{provider}] floor #{len(runs) + 1}: {len(statements[provider])} statements on "
                f"{o.tenants} databases, {o.workers} processes ..."
            )
            self.quiesce()
            runs.append(measure_floor(floor, statements[provider], o.workers, self.roots()))
            log(f"  {runs[-1]['ms_per_tenant']:.1f} ms/tenant")
            log(f"[{provider}] no-op floor: connect and read alembic_version, same databases ...")
            self.quiesce()
            noop = measure_floor(floor, [NOOP_STATEMENT], o.workers, self.roots())
            result.setdefault("noop_floor_runs", []).append(noop)
            log(f"  {noop['ms_per_tenant']:.2f} ms/tenant")
            self.servers[provider].drop(floor)

    @staticmethod
    def pair_floors(result, variants):
        """Each variant's floor: the mean of the floors measured right before and right after
        it (``floor_ms_per_tenant``); the no-op pass, which follows the first variant, gets the
        mean of the no-op floors around it. ``floor`` and ``noop_floor`` are the first runs,
        with the mean over every run as their ms_per_tenant."""
        floors, noops = result["floor_runs"], result["noop_floor_runs"]

        def mean(runs):
            return statistics.fmean(run["ms_per_tenant"] for run in runs)

        for index, variant in enumerate(variants):
            if variant in result:
                result[variant]["floor_ms_per_tenant"] = mean(floors[index : index + 2])
        for key in ("noop", "noop_recorded"):
            if key in result:
                result[key]["floor_ms_per_tenant"] = mean(noops[0:2])
        result["floor"] = {**floors[0], "ms_per_tenant": mean(floors), "wall_s": None}
        result["noop_floor"] = {**noops[0], "ms_per_tenant": mean(noops), "wall_s": None}

    def fresh(self, provider, group, count=None):
        """``count`` (N) new databases on ``provider``, each with its own admin user."""
        count = self.options.tenants if count is None else count
        log(f"[{provider}] creating {count} databases, each with its own admin user ...")
        started = time.perf_counter()
        dbs = self.servers[provider].create([self.name(provider, group, i) for i in range(count)])
        log(f"  done in {time.perf_counter() - started:.1f}s")
        return dbs

    def quiesce(self):
        server = self.servers.get("postgresql")
        if server is not None:
            server.checkpoint()
        time.sleep(0.5)

    def variants(self):
        """Product runs, each on fresh databases: the defaults, and without the schema
        verification after each upgrade (the migration alone, as the floor does)."""
        variants = {}
        if self.options.verify in ("both", "on"):
            variants["product"] = {}
        if self.options.verify in ("both", "off"):
            variants["product_noverify"] = {"VERIFY_AFTER_UPGRADE": "false"}
        return variants

    @staticmethod
    def region(variant):
        return {"product": "bench-a", "product_noverify": "bench-b"}[variant]

    def roots(self):
        """Process trees whose CPU time the measurements attribute."""
        roots = {"openbao": self.vault.process.pid}
        if self.service is not None:
            # The test rig's relay between the hosts and the services; not in the total.
            roots["rig.forwarder"] = self.service.forwarder.pid
        if self.plane is not None and self.plane.cluster is not None:
            clusters = self.plane.cluster
            roots["qcluster"] = (
                [c.pid for c in clusters] if isinstance(clusters, list) else clusters.pid
            )
            # Parts of the qcluster tree, for where its time goes (not added to the total).
            roots["qcluster.workers"] = self.plane.worker_pids()
            roots["qcluster.monitor"] = self.plane.worker_pids("monitoring")
            roots["qcluster.pusher"] = self.plane.worker_pids("pushing tasks")
        return roots

    def register(self, fleets, region):
        """Store the secrets of ``fleets`` ({provider: databases}) in OpenBao and register
        them as targets in ``region``."""
        from django.db import connections

        from tenants.models import MigrationTarget

        secrets_by_path = {}
        targets = []
        for provider, dbs in fleets.items():
            for db in dbs:
                path = db.database.replace("_", "-")
                secrets_by_path[path] = db.secret()
                if self.service is not None:
                    secrets_by_path[path]["host"] = self.service.address
                targets.append(
                    MigrationTarget(
                        name=path,
                        kind="dedicated",
                        provider=provider,
                        vault_path=path,
                        region=region,
                    )
                )
        log(f"Writing {len(secrets_by_path)} secrets to OpenBao and registering the targets ...")
        self.vault.write_secrets(secrets_by_path, threads=8)
        MigrationTarget.objects.bulk_create(targets, batch_size=500)
        connections.close_all()

    def report(self):
        o = self.options
        machine = {
            "cpus": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
            "python": platform.python_version(),
            "platform": platform.platform(),
        }
        payload = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "tenants": o.tenants,
            "workers": o.workers,
            "control_db": o.control_db,
            "broker": o.broker,
            "hosts": o.hosts,
            "machine": machine,
            "git": git_describe(),
            "results": self.results,
        }
        rows = [("PHASE", "TENANTS", "WALL S", "MS/TENANT", "x FLOOR", "LATENCY P50 MS")]
        phases = (
            ("floor", "floor: the DDL with the driver (mean)", "latency_ms", "floor"),
            ("product", "product: migrate_tenants --wait", "task_ms", "floor"),
            ("product_noverify", "  the same, VERIFY_AFTER_UPGRADE=false", "task_ms", "floor"),
            ("shell", "shell loop: alembic CLI per tenant", "latency_ms", "floor"),
            ("noop_floor", "no-op floor: connect, read version (mean)", "latency_ms", "noop_floor"),
            ("noop", "no-op pass: product, all at head", "task_ms", "noop_floor"),
            ("noop_recorded", "  the same, --skip-at-head (no read)", "command_ms", "noop_floor"),
        )
        for provider in self.servers:
            r = self.results.get(provider, {})
            for key, label, latency, versus in phases:
                if key not in r:
                    continue
                m = r[key]
                floor = m.get("floor_ms_per_tenant") or r.get(versus, {}).get("ms_per_tenant")
                rows.append(
                    (
                        f"{provider} {label}",
                        str(m["tenants"]),
                        f"{m['wall_s']:.2f}" if m["wall_s"] is not None else "",
                        f"{m['ms_per_tenant']:.2f}",
                        f"{m['ms_per_tenant'] / floor:.2f}" if floor else "",
                        f"{m[latency].get('p50', 0):.1f}",
                    )
                )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        print()
        print(
            f"Fleet benchmark: N={o.tenants}, W={o.workers}, control db {o.control_db}, "
            f"broker {o.broker}; {machine['cpus']} CPUs, {machine['memory_gib']} GiB"
        )
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        print(
            "(x FLOOR: each product row against the mean of the floors measured right before "
            "and after it, the no-op rows likewise against the no-op floors; wall: from the "
            "first run queued to the last recorded)"
        )
        for provider in self.servers:
            r = self.results.get(provider, {})
            floors = ", ".join(f"{m['ms_per_tenant']:.1f}" for m in r.get("floor_runs", []))
            noops = ", ".join(f"{m['ms_per_tenant']:.2f}" for m in r.get("noop_floor_runs", []))
            print(
                f"{provider} floors in the order measured: {floors} ms/tenant; no-op floors: "
                f"{noops}"
            )
        print(
            "\nCPU ms per tenant, by process tree (commands: manage.py, pool and alembic "
            "processes that finished; qcluster.*: parts of qcluster)"
        )
        for provider in self.servers:
            for key, *_ in phases:
                cpu = self.results.get(provider, {}).get(key, {}).get("cpu_ms_per_tenant")
                if cpu:
                    parts = ", ".join(f"{k} {v:.1f}" for k, v in cpu.items() if v >= 0.05)
                    total = sum(v for k, v in cpu.items() if "." not in k)
                    print(f"  {provider} {key}: total {total:.1f} = {parts}")
        for variant, mem in self.results.get("qcluster_memory", {}).items():
            print(f"\nqcluster workers ({variant}), kB: pid  VmRSS/VmHWM at start -> at end")
            for pid, start in mem["start"].items():
                end = mem["end"].get(pid)
                after = f"{end['rss_kb']}/{end['hwm_kb']}" if end else "recycled"
                print(f"  {pid}  {start['rss_kb']}/{start['hwm_kb']} -> {after}")
        if "memory" in self.results:
            m = self.results["memory"]
            print(
                f"\nOne process, {m['runs']} consecutive migrations ({m['ms_per_run']} ms each): "
                f"RSS {m['warm_rss_kb']} kB after 10 -> {m['end_rss_kb']} kB "
                f"({m['growth_pct']:+.1f}%)"
            )
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        name = f"fleet-{stamp}-n{o.tenants}-w{o.workers}-{o.control_db}-{o.broker}.json"
        path = RESULTS / (o.output or name)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nWrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")

    def report_registered(self, registered):
        """Print the ``--register`` phase and write it under bench/results/."""
        o = self.options
        queue = registered["queue"]
        print(
            f"\n{registered['tenants']} registered targets (no databases), control db "
            f"{o.control_db}, broker {o.broker}: `{queue['command']}` queued "
            f"{queue['runs_queued']} runs in {queue['wall_s']:.2f} s from start to exit "
            f"({queue['command_cpu_s']:.2f} s of CPU)"
        )
        print("page                  queries (first)   ms p50 (first)   with a run queued each")
        for label, before in registered["pages_before"].items():
            after = registered["pages_after"][label]
            print(
                f"  {label:<20}{before['queries']:>4} ({before['queries_first']:>2})"
                f"{before['ms'].get('p50', 0):>12.1f} ({before['first_ms']:.0f})"
                f"{after['queries']:>10} queries, {after['ms'].get('p50', 0):.1f} ms"
            )
        payload = {
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "control_db": o.control_db,
            "broker": o.broker,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "git": git_describe(),
            "registered": registered,
        }
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = RESULTS / (
            o.output or f"registered-{stamp}-n{o.register}-{o.control_db}-{o.broker}.json"
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"\nWrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")

    def cleanup(self):
        log("Cleaning up ...")
        if self.plane is not None:
            with contextlib.suppress(Exception):
                self.plane.stop_cluster()
            if self.options.register:
                with contextlib.suppress(Exception):
                    clear_queue(self.plane)  # a Redis list outlives the run
            with contextlib.suppress(Exception):
                from django.db import connections

                connections.close_all()
        # Nothing is made on the servers before OpenBao has started: they are pinged first.
        for server in self.servers.values() if self.vault is not None else ():
            try:
                server.drop_prefixed(f"{PREFIX}_{self.run_id}_")
            except Exception as exc:  # noqa: BLE001 - keep cleaning the rest
                log(
                    f"  could not drop every {server.provider} database: {exc}; "
                    "run `python bench/fleet.py --cleanup`"
                )
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.stop()
        if self.service is not None:
            self.service.stop()
        if self.vault is not None:
            self.vault.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def git_describe():
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except OSError:
        return ""


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--tenants", type=int, default=200, help="tenant databases (200)")
    parser.add_argument("-w", "--workers", type=int, default=4, help="parallelism W (4)")
    parser.add_argument(
        "--sample", type=int, default=20, help="tenants of the shell-loop baseline (20; 0 skips it)"
    )
    parser.add_argument("--mysql", action="store_true", help="also a MariaDB/MySQL fleet")
    parser.add_argument(
        "--control-db",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="the control plane's own database (sqlite)",
    )
    parser.add_argument(
        "--broker",
        choices=("orm", "redis"),
        default="orm",
        help="django-q2 broker: the control-plane database (orm) or Redis",
    )
    parser.add_argument(
        "--verify",
        choices=("both", "on", "off"),
        default="both",
        help="product runs with the schema verification after each upgrade "
        "(on: the default settings), without it (off), or both (fresh databases "
        "for each)",
    )
    parser.add_argument(
        "--memory-runs",
        type=int,
        default=1000,
        help="consecutive migrations in one process for the memory check (1000; 0 skips it)",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="cProfile (CPU time) the memory phase's upgrades (run_migration) into FILE",
    )
    parser.add_argument(
        "--hosts",
        type=int,
        default=0,
        metavar="H",
        help="run the workers on H worker hosts (network namespaces; root), W/H workers each",
    )
    parser.add_argument(
        "--register",
        type=int,
        default=0,
        metavar="N",
        help="instead of the fleet phases: register N targets without databases, time "
        "`migrate_tenants --all` queueing a run for each (no worker), and the dashboard, the "
        "changelists, /metrics and /readyz at that size (queries, ms)",
    )
    parser.add_argument("--output", metavar="NAME", help="file name under bench/results/")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument(
        "--mysql-url", default=os.environ.get("TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/mysql")
    )
    parser.add_argument(
        "--redis-url", default=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    )
    parser.add_argument(
        "--cleanup",
        action="store_true",
        help="only drop what an earlier, killed run left behind, then exit",
    )
    return parser.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_memory"]:
        runs = int(argv[argv.index("--runs") + 1])
        return memory_child(runs, argv[argv.index("--region") + 1])
    options = parse_args(argv)
    if options.cleanup:
        for server in (PostgresFleet(options.postgres_url), MySQLFleet(options.mysql_url)):
            with contextlib.suppress(Exception):
                dropped = server.drop_prefixed(f"{PREFIX}_")
                databases = sum(item.startswith("database ") for item in dropped)
                log(
                    f"{server.provider}: dropped {databases} database(s) and "
                    f"{len(dropped) - databases} user(s)"
                )
        return 0
    bench = Bench(options)
    # Ctrl-C (even when started in the background, where SIGINT comes in ignored) and SIGTERM
    # both stop the run and clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        bench.run()
    except KeyboardInterrupt:
        log("Interrupted.")
        return 130
    except devservices.ServiceUnavailable as exc:
        log(str(exc))
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not stop the cleanup
        bench.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
