"""migrator.runner on real PostgreSQL and MariaDB databases, and on SQLite files."""

import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text

from migrator import engines, locks, process, runner
from migrator.exceptions import (
    MigrationError,
    MigrationFailed,
    MultipleHeads,
    RevisionNotFound,
    TargetLocked,
    UnknownProvider,
)
from migrator.providers import postgresql
from migrator.secrets import ConnectionInfo
from migrator.targets import Target

FIXTURES = Path(__file__).parent / "alembic_fixtures"
FAILING = FIXTURES / "failing"
TWO_HEADS = FIXTURES / "two_heads"
SLOW = FIXTURES / "slow"

CHAIN = [
    "0001_accounts",
    "0002_projects",
    "0003_projects_account_name",
    "0004_accounts_display_name",
]
HEAD = CHAIN[-1]
LINEAR = FIXTURES / "linear"


@pytest.fixture(autouse=True)
def _linear_chain(settings):
    """The runner's mechanics, tested on a fixed straight chain (the product's example chain
    branches into expand/contract; tests/test_rollback_phases.py covers that)."""
    settings.TENANT_MIGRATIONS_DIR = str(LINEAR)


servers = [pytest.mark.postgres, pytest.mark.mysql]


@pytest.fixture
def sqlite_target(tmp_path):
    return Target("abc123", ConnectionInfo(provider="sqlite", database=str(tmp_path / "t.db")))


def tables(target):
    with engines.connect(target) as connection:
        return set(inspect(connection).get_table_names())


def account_columns(target):
    with engines.connect(target) as connection:
        return {column["name"] for column in inspect(connection).get_columns("accounts")}


# --- The starter chain, on each server -------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.mysql
def test_upgrade_empty_database_to_head(server_database, target_for, caplog):
    target = target_for(server_database())
    caplog.set_level("INFO", logger="migrator.runner")

    result = runner.upgrade(target)

    assert result.applied == CHAIN
    assert (result.revision_before, result.revision_after) == (None, HEAD)
    assert result.kind == "upgrade" and result.target == "abc123"
    assert {"accounts", "projects", "alembic_version"} <= tables(target)
    assert "display_name" in account_columns(target)
    assert result.log[0] == "Starting migration for tenant abc123"
    assert "Found 4 pending migrations for tenant abc123" in result.log
    assert f"Running upgrade 0003_projects_account_name -> {HEAD}" in "\n".join(result.log)
    assert result.log[-1] == (
        f"Successfully applied 4 migrations for tenant abc123 in {result.duration_ms}ms"
    )
    logged = [r.getMessage() for r in caplog.records if r.name == "migrator.runner"]
    assert logged == [line for line in result.log if line in logged] and len(logged) == 3
    assert runner.current(target).up_to_date


@pytest.mark.postgres
@pytest.mark.mysql
def test_version_bookkeeping_is_compiled_once_per_process(server_database, target_for):
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    runner.upgrade(target_for(server_database(), name="first"))
    compiled = []

    def record(conn, cursor, statement, parameters, context, executemany):
        if "alembic_version" in statement and statement.lstrip().upper().startswith(
            ("INSERT", "UPDATE")
        ):
            compiled.append(context._get_cache_stats())

    event.listen(Engine, "after_cursor_execute", record)
    try:
        result = runner.upgrade(target_for(server_database(), name="second"))
    finally:
        event.remove(Engine, "after_cursor_execute", record)

    # A second database of the same server: its version rows are written by statements
    # SQLAlchemy compiled for the first one.
    assert result.applied == CHAIN and len(compiled) == len(CHAIN)
    assert all(stats.startswith("cached since") for stats in compiled), compiled


@pytest.mark.postgres
@pytest.mark.mysql
def test_a_run_sends_the_revisions_and_few_statements_of_its_own(server_database, target_for):
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    runner.upgrade(target_for(server_database(), name="first"))  # the server's engine is made
    target = target_for(server_database())
    sent = []
    in_autocommit = set()

    def record(conn, cursor, statement, parameters, context, executemany):
        sent.append(" ".join(statement.split()))
        if getattr(conn.connection.dbapi_connection, "autocommit", False) is True:  # psycopg
            in_autocommit.add(sent[-1])

    event.listen(Engine, "before_cursor_execute", record)
    try:
        result = runner.upgrade(target)
    finally:
        event.remove(Engine, "before_cursor_execute", record)

    assert result.applied == CHAIN
    revisions = (
        "CREATE ",
        "ALTER ",
        "DROP ",
        "INSERT INTO alembic_version",
        "UPDATE alembic_version",
    )
    own = [statement for statement in sent if not statement.startswith(revisions)]
    read = "SELECT version_num FROM alembic_version"
    # alembic_version read, the lock taken (PostgreSQL: with the session's timeouts in the same
    # statement; MySQL sets lock_wait_timeout once it holds it, and the server names the lock
    # after the database in the statement that takes it), alembic_version read again under the
    # lock. Nothing asks the catalog whether alembic_version exists, and nothing releases the
    # lock: it goes with the connection.
    lock = own[1:-1]
    assert own[0] == own[-1] == read and len(lock) == (1 if target.provider == "postgresql" else 2)
    assert not any("pg_catalog.pg_class" in s or "information_schema" in s for s in sent)
    assert not any("unlock" in s.lower() or "RELEASE_LOCK" in s for s in sent)
    if target.provider == "postgresql":
        # Our own statements go in autocommit: no BEGIN and COMMIT (or ROLLBACK) round trips
        # around them. Each revision runs in a transaction of its own, as Alembic opens it.
        assert in_autocommit == set(own)
        assert not any(statement.startswith(revisions) for statement in in_autocommit)
    # ... and the next run can take it at once.
    with engines.connect(target) as connection:
        with locks.target_lock(connection, timeout=0, target_name=target.name):
            pass


RECORDING_REVISION = """
from alembic import op

revision = "s001_seen"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE TABLE seen AS SELECT current_setting('lock_timeout') AS lock_timeout, "
        "current_setting('statement_timeout') AS statement_timeout, "
        "current_setting('tcp_keepalives_idle') AS tcp_keepalives_idle, "
        "current_setting('tcp_keepalives_interval') AS tcp_keepalives_interval, "
        "current_setting('tcp_keepalives_count') AS tcp_keepalives_count, "
        "current_setting('tcp_user_timeout') AS tcp_user_timeout"
    )


def downgrade() -> None:
    op.execute("DROP TABLE seen")
"""


def recording_chain(path: Path) -> Path:
    """An Alembic directory at ``path`` whose one revision, s001, keeps the PostgreSQL session's
    lock_timeout, statement_timeout and TCP keepalive settings, as they are while it runs, in a
    table `seen`."""
    env = Path(__file__).resolve().parent.parent / "tenant_migrations" / "env.py"
    (path / "versions").mkdir(parents=True)
    (path / "env.py").write_text(f"import runpy\nrunpy.run_path({str(env)!r})\n")
    (path / "versions" / "s001_seen.py").write_text(RECORDING_REVISION)
    return path


def seen_timeouts(target) -> dict:
    """What the recording revision saw: {"lock_timeout": ..., "statement_timeout": ...,
    "tcp_keepalives_idle": ..., ...}."""
    with engines.connect(target) as connection:
        return dict(connection.execute(text("SELECT * FROM seen")).mappings().one())


@pytest.mark.postgres
def test_a_short_statement_timeout_does_not_cut_the_wait_for_the_lock(
    pg_database, target_for, settings, tmp_path
):
    import psycopg

    settings.MIGRATION_PG_STATEMENT_TIMEOUT = "300ms"
    settings.MIGRATION_LOCK_TIMEOUT = 20
    db = pg_database()
    target = target_for(db)
    scripts = recording_chain(tmp_path / "recording")
    holder = psycopg.connect(
        host=db.host, port=db.port, user="postgres", dbname=db.database, autocommit=True
    )
    holder.execute("SELECT pg_advisory_lock(%s)", (postgresql.LOCK_KEY,))
    releaser = threading.Timer(1.5, holder.close)  # closing the session releases its lock
    started = time.monotonic()
    releaser.start()
    try:
        result = runner.upgrade(target, script_location=scripts)
    finally:
        releaser.cancel()
        holder.close()

    # The run waited for the other session (longer than its statement timeout), then its
    # revision ran with the session's own timeout back in force.
    assert time.monotonic() - started >= 1.4
    assert result.applied == ["s001_seen"]
    seen = seen_timeouts(target)
    assert seen["statement_timeout"] == "300ms"
    assert seen["lock_timeout"] == settings.MIGRATION_PG_LOCK_TIMEOUT  # not the wait's bound
    assert seen["tcp_keepalives_idle"] != "0"  # set with the lock, kept through the wait


@pytest.mark.postgres
@pytest.mark.mysql
def test_at_head_nothing_runs_and_no_lock_is_taken(server_database, target_for, monkeypatch):
    target = target_for(server_database())
    runner.upgrade(target)

    def no_lock(*args, **kwargs):
        raise AssertionError("the fast path must not take the target lock")

    monkeypatch.setattr(runner.locks, "target_lock", no_lock)
    result = runner.upgrade(target)

    assert result.applied == []
    assert result.revision_before == result.revision_after == HEAD
    assert result.log == [
        "Starting migration for tenant abc123",
        "Found 0 pending migrations for tenant abc123",
        f"Successfully applied 0 migrations for tenant abc123 in {result.duration_ms}ms",
    ]


@pytest.mark.postgres
@pytest.mark.mysql
def test_upgrade_to_a_middle_revision_then_on_to_head(server_database, target_for):
    target = target_for(server_database())

    middle = runner.upgrade(target, "0002_projects")
    assert middle.applied == CHAIN[:2]
    assert runner.pending(target).revisions == CHAIN[2:]
    assert "display_name" not in account_columns(target)

    rest = runner.upgrade(target)
    assert rest.applied == CHAIN[2:]
    assert rest.revision_before == "0002_projects"
    assert "display_name" in account_columns(target)


@pytest.mark.postgres
@pytest.mark.mysql
def test_downgrade_one_revision_then_to_base(server_database, target_for):
    target = target_for(server_database())
    runner.upgrade(target)

    one = runner.downgrade(target, "-1")
    assert one.applied == [HEAD]
    assert one.revision_after == "0003_projects_account_name"
    assert "display_name" not in account_columns(target)
    assert "Found 1 migrations to revert for tenant abc123" in one.log

    everything = runner.downgrade(target, "base")
    assert everything.applied == list(reversed(CHAIN[:3]))
    assert everything.revision_after is None
    assert tables(target) == {"alembic_version"}
    assert runner.current(target).revisions == ()


@pytest.mark.postgres
@pytest.mark.mysql
def test_failing_revision_leaves_target_at_last_good_one(server_database, target_for):
    db = server_database()
    target = target_for(db)

    with pytest.raises(MigrationFailed) as caught:
        runner.upgrade(target, script_location=FAILING)

    error = caught.value
    assert error.failed_revision == "f003_broken"
    assert error.current_revision == "f002_gadgets"
    assert "f003_broken" in str(error) and "f002_gadgets" in str(error)
    assert "no_such_table" in str(error)
    assert error.result.applied == ["f001_widgets", "f002_gadgets"]
    assert error.result.revision_after == "f002_gadgets"
    assert error.result.log[-1].startswith(
        "Migration failed for tenant abc123 at revision f003_broken: "
    )
    assert runner.current(target, script_location=FAILING).revisions == ("f002_gadgets",)
    assert db.admin_password not in str(error)
    if db.provider == "mysql":
        # MySQL commits DDL at once: the table of the broken revision stays, and the message
        # says to look.
        assert "partly applied" in str(error)
        assert "gizmos" in tables(target)
    else:
        assert "gizmos" not in tables(target)


@pytest.mark.postgres
def test_postgresql_session_gets_the_migration_timeouts(
    pg_database, target_for, settings, tmp_path
):
    settings.MIGRATION_PG_LOCK_TIMEOUT = "3s"
    settings.MIGRATION_PG_STATEMENT_TIMEOUT = "1min"
    settings.RUN_STALE_AFTER_SECONDS = 80
    target = target_for(pg_database())

    result = runner.upgrade(target, script_location=recording_chain(tmp_path / "recording"))

    # The revision ran under these timeouts, and with the server's keepalives on its session
    # ending it within 3/4 of RUN_STALE_AFTER_SECONDS of silence (20s, then 4 probes 10s apart).
    assert result.applied == ["s001_seen"]
    assert seen_timeouts(target) == {
        "lock_timeout": "3s",
        "statement_timeout": "1min",
        "tcp_keepalives_idle": "20",
        "tcp_keepalives_interval": "10",
        "tcp_keepalives_count": "4",
        "tcp_user_timeout": "60000",  # milliseconds
    }


# --- Errors ---------------------------------------------------------------------------------


@pytest.mark.postgres
def test_unknown_revision_names_the_head(pg_database, target_for):
    target = target_for(pg_database())

    with pytest.raises(RevisionNotFound) as caught:
        runner.upgrade(target, "0099_nope")

    assert "'0099_nope'" in str(caught.value) and HEAD in str(caught.value)
    assert caught.value.result.applied == []
    assert runner.current(target).revisions == ()


def test_database_at_a_revision_the_code_does_not_know(sqlite_target):
    runner.upgrade(sqlite_target)
    with engines.connect(sqlite_target) as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099_future'"))
        connection.commit()

    with pytest.raises(RevisionNotFound) as caught:
        runner.upgrade(sqlite_target)

    assert "database is at revision 0099_future" in str(caught.value)


def test_two_heads_need_a_choice(sqlite_target):
    with pytest.raises(MultipleHeads) as caught:
        runner.upgrade(sqlite_target, script_location=TWO_HEADS)

    assert "h002_left" in str(caught.value) and "h002_right" in str(caught.value)
    assert "'heads'" in str(caught.value)

    result = runner.upgrade(sqlite_target, "heads", script_location=TWO_HEADS)
    assert result.applied[0] == "h001_base"
    assert sorted(result.applied[1:]) == ["h002_left", "h002_right"]


def test_downgrade_below_base_is_refused_clearly(sqlite_target):
    with pytest.raises(MigrationError) as caught:
        runner.downgrade(sqlite_target, "-1")

    assert "base" in str(caught.value)
    assert caught.value.result.kind == "downgrade"


def test_unknown_provider_fails_before_anything_runs():
    target = Target("abc123", ConnectionInfo(provider="oracle", host="h", database="d"))

    with pytest.raises(UnknownProvider) as caught:
        runner.upgrade(target)

    assert "sqlserver" in str(caught.value)
    assert caught.value.result.applied == []


# --- SQLite ---------------------------------------------------------------------------------


def test_sqlite_upgrade_and_downgrade(sqlite_target):
    result = runner.upgrade(sqlite_target)
    assert result.applied == CHAIN
    assert "display_name" in account_columns(sqlite_target)

    # 0004's downgrade drops a column: batch mode rebuilds the table on SQLite.
    back = runner.downgrade(sqlite_target, "0002_projects")
    assert back.applied == [HEAD, "0003_projects_account_name"]
    assert "display_name" not in account_columns(sqlite_target)
    assert {"accounts", "projects"} <= tables(sqlite_target)


def test_env_py_is_compiled_once_per_process(sqlite_target, tmp_path, monkeypatch):
    other = Target("def456", ConnectionInfo(provider="sqlite", database=str(tmp_path / "o.db")))
    assert runner.upgrade(sqlite_target).applied == CHAIN

    def no_compiling(*args, **kwargs):
        raise AssertionError("env.py compiled again")

    # Later runs execute the code compiled by the first one, and still run env.py each time.
    monkeypatch.setattr(runner, "compile", no_compiling, raising=False)
    assert runner.upgrade(other).applied == CHAIN
    assert runner.downgrade(other, "base").applied[-1] == CHAIN[0]
    process.reset()  # forgotten: env.py is read again
    with pytest.raises(AssertionError, match="env.py compiled again"):
        runner.upgrade(other)


def test_sqlite_failing_revision_rolls_back_whole(sqlite_target):
    with pytest.raises(MigrationFailed) as caught:
        runner.upgrade(sqlite_target, script_location=FAILING)

    assert caught.value.current_revision == "f002_gadgets"
    assert "gizmos" not in tables(sqlite_target)


# --- Locking, processes, threads -------------------------------------------------------------


def _upgrade_in_child(target, script_location, env, results):
    """Runs in a spawned process: one upgrade, reported back through ``results``."""
    os.environ.update(env)
    try:
        result = runner.upgrade(target, script_location=script_location)
    except Exception as exc:  # noqa: BLE001 - reported to the parent test
        results.put(("error", type(exc).__name__, str(exc)))
    else:
        results.put(("ok", result.applied, None))


def _start_slow_child(target, tmp_path, sleep):
    """Start a spawned process upgrading ``target`` with the slow fixture chain and return once
    it is inside the sleeping revision, holding the target lock."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    signal = tmp_path / "child-is-migrating"
    env = {"MIGRATOR_TEST_SIGNAL": str(signal), "MIGRATOR_TEST_SLEEP": str(sleep)}
    child = context.Process(target=_upgrade_in_child, args=(target, str(SLOW), env, results))
    child.start()
    deadline = time.monotonic() + 60
    while not signal.exists():
        assert child.is_alive() or not results.empty(), "the child process died"
        assert time.monotonic() < deadline, "the child never reached the sleeping revision"
        time.sleep(0.05)
    return child, results


@pytest.mark.postgres
@pytest.mark.mysql
def test_second_process_waits_for_the_lock_then_has_nothing_to_do(
    server_database, target_for, tmp_path
):
    target = target_for(server_database())
    child, results = _start_slow_child(target, tmp_path, sleep=2)

    result = runner.upgrade(target, script_location=SLOW)

    child.join(60)
    status, applied, error = results.get(timeout=10)
    assert (status, error) == ("ok", None)
    assert applied == ["s001_first", "s002_sleepy", "s003_last"]
    # This run saw pending work, waited for the lock, re-read the version under it, and found
    # that the other process had done everything: each revision ran exactly once.
    assert result.applied == []
    assert result.revision_before == result.revision_after == "s003_last"
    assert "Found 0 pending migrations for tenant abc123" in result.log
    assert any(line.startswith("Context impl") for line in result.log)


@pytest.mark.postgres
@pytest.mark.mysql
def test_second_process_gives_up_after_the_lock_timeout(
    server_database, target_for, tmp_path, settings
):
    settings.MIGRATION_LOCK_TIMEOUT = 1
    target = target_for(server_database())
    child, results = _start_slow_child(target, tmp_path, sleep=3)

    with pytest.raises(TargetLocked) as caught:
        runner.upgrade(target, script_location=SLOW)

    child.join(60)
    assert results.get(timeout=10)[0] == "ok"
    assert "locked by another run" in str(caught.value)
    assert caught.value.retryable
    assert caught.value.result.applied == []
    assert runner.current(target, script_location=SLOW).revision == "s003_last"


def test_sqlite_lock_file_keeps_a_second_run_out(sqlite_target, tmp_path, settings):
    settings.MIGRATION_LOCK_TIMEOUT = 0
    child, results = _start_slow_child(sqlite_target, tmp_path, sleep=2)

    with pytest.raises(TargetLocked):
        runner.upgrade(sqlite_target, script_location=SLOW)

    child.join(60)
    assert results.get(timeout=10)[0] == "ok"


def test_threads_are_serialized_not_crashed(tmp_path):
    targets = [
        Target(f"t{i}", ConnectionInfo(provider="sqlite", database=str(tmp_path / f"{i}.db")))
        for i in range(4)
    ]
    outcomes = {}

    def upgrade(target):
        try:
            outcomes[target.name] = runner.upgrade(target).applied
        except Exception as exc:  # noqa: BLE001 - recorded for the assertion
            outcomes[target.name] = exc

    threads = [threading.Thread(target=upgrade, args=(target,)) for target in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert outcomes == {target.name: CHAIN for target in targets}


def test_script_directory_is_loaded_once_per_process(tmp_path, monkeypatch):
    original = ScriptDirectory.from_config
    loads = []

    def counting(config):
        loads.append(config.get_main_option("script_location"))
        return original(config)

    monkeypatch.setattr(ScriptDirectory, "from_config", counting)
    process.reset()
    for i in range(5):
        target = Target(
            f"t{i}", ConnectionInfo(provider="sqlite", database=str(tmp_path / f"{i}.db"))
        )
        runner.upgrade(target)
        runner.current(target)
        runner.pending(target)
        runner.downgrade(target, "base")
        runner.sql_preview(target)
    runner.heads()

    assert len(loads) == 1


def test_the_cluster_preload_keeps_what_it_loaded_out_of_the_collector(monkeypatch):
    import gc

    from controlplane.apps import preload_worker_modules

    gc.unfreeze()
    try:
        preload_worker_modules()
        # The modules, the dialects and the script directory: what every worker shares.
        assert gc.get_freeze_count() > 10_000
        # The revisions are read and env.py compiled: a worker's first run does neither.
        script = runner.script_directory()
        assert "_revision_map" in vars(script.revision_map)  # Alembic's memoized map

        def no_compiling(*args, **kwargs):
            raise AssertionError("env.py compiled again")

        monkeypatch.setattr(runner, "compile", no_compiling, raising=False)
        assert "CREATE TABLE accounts" in runner.sql_preview("postgresql").sql
    finally:
        gc.unfreeze()


def test_alembic_lines_go_to_their_own_run_and_to_the_log_only_as_configured(tmp_path, caplog):
    """Each run's log has Alembic's "Running upgrade" lines of that run only; the worker's log
    shows them only when the logging configuration lets the ``alembic`` logger's INFO through
    (the project sets it to WARNING), whatever it said when the first run started."""
    import logging

    first, second = (
        Target(name, ConnectionInfo(provider="sqlite", database=str(tmp_path / f"{name}.db")))
        for name in ("first", "second")
    )
    caplog.set_level("INFO")  # the root and its handler
    caplog.set_level("WARNING", logger="alembic")  # as the project's LOGGING says
    one = runner.upgrade(first, CHAIN[1])
    two = runner.upgrade(second)

    assert sum("Running upgrade" in line for line in one.log) == 2
    assert sum("Running upgrade" in line for line in two.log) == 4
    assert "Running upgrade" not in caplog.text

    # Outside a run, an Alembic line goes to no run's log.
    logging.getLogger("alembic.runtime.migration").info("Running upgrade x -> y")
    assert not any("x -> y" in line for line in one.log + two.log)

    # The configuration lets them through now: the next run's lines reach the log as well.
    caplog.set_level("INFO", logger="alembic")
    runner.upgrade(first)
    assert f"Running upgrade {CHAIN[1]} -> {CHAIN[2]}" in caplog.text
