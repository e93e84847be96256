"""The plain `alembic` CLI works on tenant_migrations/ for migration authors, from the repo root."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from migrator import engines, locks, runner

REPO = Path(__file__).resolve().parent.parent
# The example chain ends in expand and contract branches: "heads" upgrades both (plain Alembic
# asks for it; the control plane's runner takes "head" to mean every labelled head).
HEAD = "0006_contract_drop_display_name"


def alembic(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **env},
    )


def test_upgrade_and_downgrade_a_sqlite_file(tmp_path):
    path = tmp_path / "dev.sqlite3"
    url = f"sqlite:///{path}"

    upgraded = alembic("-x", f"url={url}", "upgrade", "heads")

    assert upgraded.returncode == 0, upgraded.stderr
    assert f"Running upgrade 0004_accounts_display_name -> {HEAD}" in upgraded.stderr
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
    current = alembic("-x", f"url={url}", "current")
    assert HEAD in current.stdout

    downgraded = alembic("-x", f"url={url}", "downgrade", "base")
    assert downgraded.returncode == 0, downgraded.stderr
    with sqlite3.connect(path) as conn:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
    assert "accounts" not in tables


def test_heads_and_history_need_no_database():
    heads = alembic("heads")

    assert heads.returncode == 0, heads.stderr
    assert HEAD in heads.stdout and "0005_expand_full_name (expand)" in heads.stdout
    assert "0001_accounts" in alembic("history").stdout


def test_offline_sql_for_sql_server():
    result = alembic("-x", "url=mssql+pyodbc://author@localhost/dev", "upgrade", "heads", "--sql")

    assert result.returncode == 0, result.stderr
    assert "CREATE TABLE accounts" in result.stdout
    assert "ALTER TABLE accounts ADD display_name" in result.stdout


@pytest.mark.postgres
def test_upgrade_a_postgresql_database_the_runner_then_agrees_with(pg_database, target_for):
    db = pg_database()
    # The password holds @ : / %; URL rendering quotes them for the command line.
    url = db.sqlalchemy_url().render_as_string(hide_password=False)

    result = alembic("-x", f"url={url}", "upgrade", "heads")

    assert result.returncode == 0, result.stderr
    assert db.admin_password not in result.stderr
    state = runner.current(target_for(db))
    assert state.revisions == (HEAD,)
    assert state.up_to_date


@pytest.mark.postgres
def test_cli_waits_for_the_control_planes_lock(pg_database, target_for):
    db = pg_database()
    url = db.sqlalchemy_url().render_as_string(hide_password=False)

    with engines.connect(target_for(db)) as connection:
        with locks.target_lock(connection, timeout=1, target_name="abc123"):
            result = alembic("-x", f"url={url}", "upgrade", "heads", MIGRATION_LOCK_TIMEOUT="1")

    assert result.returncode != 0
    assert "locked by another run" in result.stderr
    assert db.admin_password not in result.stderr
    assert runner.current(target_for(db)).revisions == ()
