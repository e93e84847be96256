"""SQL Server: the chain's SQL generated offline (no server here), and a live run when
TEST_MSSQL_URL points at one."""

import secrets

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from migrator import runner
from migrator.secrets import ConnectionInfo
from migrator.targets import Target
from tests import services

CHAIN = [
    "0001_accounts",
    "0002_projects",
    "0003_projects_account_name",
    "0004_accounts_display_name",
    "0005_expand_full_name",
    "0006_contract_drop_display_name",
]


def test_whole_chain_for_sql_server():
    preview = runner.sql_preview("sqlserver")

    assert preview.dialect == "mssql"
    assert preview.revisions == CHAIN
    sql = preview.sql
    expected_in_order = [
        "CREATE TABLE alembic_version",
        "CREATE TABLE accounts (",
        "id INTEGER NOT NULL IDENTITY",
        "created_at DATETIMEOFFSET NOT NULL DEFAULT CURRENT_TIMESTAMP",
        "CONSTRAINT uq_accounts_email UNIQUE (email)",
        "INSERT INTO alembic_version (version_num) OUTPUT inserted.version_num VALUES "
        "('0001_accounts')",
        "CREATE TABLE projects (",
        "CONSTRAINT fk_projects_account_id_accounts FOREIGN KEY(account_id) "
        "REFERENCES accounts (id) ON DELETE CASCADE",
        "CREATE INDEX ix_projects_account_id ON projects (account_id)",
        "UPDATE alembic_version SET version_num='0002_projects'",
        "CREATE UNIQUE INDEX ix_projects_account_id_name ON projects (account_id, name)",
        "UPDATE alembic_version SET version_num='0003_projects_account_name'",
        "ALTER TABLE accounts ADD display_name VARCHAR(200) NULL",
        "UPDATE alembic_version SET version_num='0004_accounts_display_name' "
        "WHERE alembic_version.version_num = '0003_projects_account_name'",
        # The expand/contract pair: add and backfill full_name, then drop display_name.
        "ALTER TABLE accounts ADD full_name VARCHAR(200) NULL",
        "UPDATE accounts SET full_name = display_name WHERE full_name IS NULL",
        "UPDATE alembic_version SET version_num='0005_expand_full_name'",
        "ALTER TABLE accounts DROP COLUMN display_name",
        "UPDATE alembic_version SET version_num='0006_contract_drop_display_name' "
        "WHERE alembic_version.version_num = '0005_expand_full_name'",
    ]
    assert [statement for statement in expected_in_order if statement not in sql] == []
    positions = [sql.find(statement) for statement in expected_in_order]
    assert positions == sorted(positions)
    # One transaction per revision, batches separated for sqlcmd.
    assert sql.count("BEGIN TRANSACTION;") == len(CHAIN)
    assert sql.count("COMMIT;") == len(CHAIN)
    # The PostgreSQL-only trigger of the expand revision is not rendered for SQL Server.
    assert "TRIGGER" not in sql
    assert "\nGO\n" in sql


def test_part_of_the_chain_needs_no_connection():
    # The target's host does not exist: offline mode never connects.
    target = Target(
        "abc123",
        ConnectionInfo(
            provider="sqlserver", host="nowhere.invalid", database="tenant", username="sa"
        ),
    )

    preview = runner.sql_preview(target, "0002_projects", "head")

    assert preview.revisions == CHAIN[2:]
    assert "CREATE TABLE accounts" not in preview.sql
    assert "CREATE TABLE alembic_version" not in preview.sql
    assert "CREATE UNIQUE INDEX ix_projects_account_id_name" in preview.sql


@pytest.mark.parametrize(
    ("provider", "statement"),
    [
        ("postgresql", "created_at TIMESTAMP WITH TIME ZONE DEFAULT CURRENT_TIMESTAMP NOT NULL"),
        ("mysql", "created_at DATETIME NOT NULL DEFAULT CURRENT_TIMESTAMP"),
        ("sqlite", "ALTER TABLE accounts ADD COLUMN display_name VARCHAR(200)"),
    ],
)
def test_every_dialect_renders_the_chain(provider, statement):
    preview = runner.sql_preview(provider)

    assert preview.revisions == CHAIN
    assert statement in preview.sql


@pytest.mark.mssql
@pytest.mark.skipif(
    not services.TEST_MSSQL_URL,
    reason="no SQL Server here: set TEST_MSSQL_URL=mssql+pyodbc://sa:...@host:1433/master"
    "?driver=...&TrustServerCertificate=yes to run it",
)
def test_live_sql_server_upgrade_and_downgrade():
    url = make_url(services.TEST_MSSQL_URL)
    database = f"t_ms_{secrets.token_hex(5)}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE DATABASE [{database}]"))
    try:
        query = dict(url.query)
        target = Target(
            "abc123",
            ConnectionInfo(
                provider="sqlserver",
                host=url.host,
                port=url.port,
                database=database,
                username=url.username,
                password=url.password,
                driver=query.pop("driver", None),
                options=query,
            ),
        )

        assert runner.upgrade(target).applied == CHAIN
        assert runner.upgrade(target).applied == []
        assert runner.downgrade(target, "base").applied == list(reversed(CHAIN))
    finally:
        with admin.connect() as conn:
            conn.execute(
                text(f"ALTER DATABASE [{database}] SET SINGLE_USER WITH ROLLBACK IMMEDIATE")
            )
            conn.execute(text(f"DROP DATABASE [{database}]"))
        admin.dispose()
