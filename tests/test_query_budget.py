"""The control plane's own database work per migration run is a constant, whatever the fleet.

A worker touches the control-plane database only to take the run and to record what happened;
nothing it does reads more as the fleet, the run history or the revision chain grow. The budget
is stated here and in bench/README.md: at most QUERIES_PER_RUN queries for a run that applies the
whole chain (11 today, with the verification after the upgrade: take the run, read it with its
target, mark the target migrating, record the verification on both, record the outcome on both,
and the savepoints around them) and for a run with nothing to do (7 today).
"""

import pytest

from migrator import runner
from migrator.tasks import run_migration
from tenants import actions
from tenants.models import MigrationRun, Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.vault]

QUERIES_PER_RUN = 12


@pytest.fixture
def sqlite_target(vault, vault_secret, target_factory, tmp_path):
    """Factory: a SQLite target database (a file of its own), its secret in OpenBao."""

    def make(name):
        vault_secret(name, {"provider": "sqlite", "database": str(tmp_path / f"{name}.sqlite3")})
        return target_factory(name=name, provider="sqlite", vault_path=name)

    return make


@pytest.fixture
def migrate(django_assert_max_num_queries):
    """Queue a run for ``target`` and execute it here within the budget; return the run and
    the number of control-plane queries it made."""

    def run(target):
        [dispatch] = actions.do_enqueue_runs([target], trigger=Trigger.COMMAND, enqueue=False)
        with django_assert_max_num_queries(QUERIES_PER_RUN) as queries:
            run_migration(dispatch.run.pk)
        dispatch.run.refresh_from_db()
        return dispatch.run, len(queries.captured_queries)

    return run


def test_queries_per_run_are_a_constant(sqlite_target, migrate):
    targets = [sqlite_target(f"budget-{n}") for n in range(4)]
    chain = len(list(runner.script_directory().walk_revisions()))

    upgrades = [migrate(target) for target in targets]
    for run, _ in upgrades:
        assert (run.status, len(run.applied)) == ("succeeded", chain)
    # The history grew by a run per target: a later run does not read more of it.
    assert len({count for _, count in upgrades}) == 1

    # Every target is at head now: nothing to apply.
    noops = [migrate(target) for target in targets]
    for run, _ in noops:
        assert (run.status, run.applied) == ("skipped", [])
    assert len({count for _, count in noops}) == 1
    assert MigrationRun.objects.count() == 2 * len(targets)
