"""The engine returns values: ``migrator.pipeline.run`` migrates a database and says what it did,
and only the bridge (``migrator.tasks``) writes the record."""

import ast
from pathlib import Path

import pytest

from migrator import pipeline, runner
from migrator.pipeline import Intent, Options, TargetRef
from tenants.models import MigrationRun

pytestmark = [pytest.mark.django_db, pytest.mark.vault]

MIGRATOR = Path(__file__).resolve().parent.parent / "migrator"


@pytest.fixture
def backup_dir(settings, tmp_path):
    settings.BACKUP_DIR = str(tmp_path / "backups")
    return tmp_path / "backups"


@pytest.fixture
def sqlite_ref(vault, vault_secret, target_factory, tmp_path):
    """A SQLite database with its secret in OpenBao, its target recorded, and its TargetRef."""
    vault_secret("pipe", {"provider": "sqlite", "database": str(tmp_path / "pipe.sqlite3")})
    record = target_factory(name="pipe", provider="sqlite", vault_path="pipe")
    return record, TargetRef("pipe", "sqlite", "pipe")


def test_a_run_returns_what_it_did_and_writes_no_record(sqlite_ref, backup_dir):
    record, ref = sqlite_ref
    heads = runner.heads()

    outcome = pipeline.run(ref, Intent(), Options(backup=True, run_id=7))

    assert outcome.succeeded and outcome.error is None
    assert outcome.result.revision_before is None
    assert outcome.result.revision_after in heads
    chain = [r.revision for r in runner.script_directory().walk_revisions()]
    assert sorted(outcome.result.applied) == sorted(chain)
    assert outcome.heads == heads
    assert outcome.credentials.mode == "static" and outcome.server == ""
    # The backup before the run (the database was empty: base), named after the run id.
    assert outcome.backup.revision is None and outcome.backup.path.endswith("-run7.sqlite3")
    assert Path(outcome.backup.path).is_file()
    # The database moved; the record did not: writing it is the bridge's job.
    assert pipeline.read_revision(ref) == outcome.result.revision_after
    record.refresh_from_db()
    assert record.revision == "" and not MigrationRun.objects.exists()

    again = pipeline.run(ref, Intent(), Options(backup=True, run_id=8))
    assert again.succeeded and again.result.applied == []
    assert again.backup is None  # nothing pending: nothing to undo, no backup


def test_a_failure_is_an_outcome_not_an_exception(sqlite_ref):
    _, ref = sqlite_ref

    outcome = pipeline.run(ref, Intent(revision="no_such_revision"))

    assert not outcome.succeeded
    assert outcome.error.code == "revision_not_found"
    assert "no_such_revision" in str(outcome.error)
    assert outcome.heads == runner.heads()


def test_a_secret_that_cannot_be_read_is_an_outcome(vault):
    outcome = pipeline.run(TargetRef("ghost", "postgresql", "no-such-secret"), Intent())

    assert not outcome.succeeded and outcome.error.code == "secret_not_found"
    assert "no-such-secret" in str(outcome.error)
    assert outcome.result is None and outcome.credentials is None


def test_only_the_bridge_imports_the_record():
    importers = set()
    for path in MIGRATOR.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(name == "tenants" or name.startswith("tenants.") for name in names):
                importers.add(path.relative_to(MIGRATOR).as_posix())
    assert importers == {"tasks.py"}
