"""The control plane's own database work per migration run is a constant, whatever the fleet.

A worker touches the control-plane database only to take the run and to record what happened;
nothing it does reads more as the fleet, the run history or the revision chain grow. The budget
is stated here and in bench/README.md: at most QUERIES_PER_RUN queries for a run that applies the
whole chain and for a run with nothing to do (6 for both today: take the run, mark its target
migrating, each returning its row where the database can, record the outcome on both, with the
verification after an upgrade in the same saves, and the transaction around them).
"""

import pytest

from migrator import runner
from migrator.tasks import run_migration
from tenants import actions
from tenants.models import MigrationRun, Trigger

pytestmark = [pytest.mark.django_db, pytest.mark.vault]

QUERIES_PER_RUN = 6


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


def test_queueing_a_fleet_costs_a_few_statements_and_never_a_second_run(
    target_factory, django_assert_max_num_queries
):
    targets = [target_factory(name=f"fleet-{n}") for n in range(1200)]
    # Someone else already queued a run for one of them.
    [busy] = actions.do_enqueue_runs([targets[700]], trigger=Trigger.ADMIN, enqueue=False)

    # The active runs read and the new ones inserted many at a time (SQLite takes 999 values per
    # statement: a few dozen rows), in one transaction: not a savepoint and an INSERT per target.
    with django_assert_max_num_queries(len(targets) // 20):
        dispatches = actions.do_enqueue_runs(targets, trigger=Trigger.COMMAND, enqueue=False)

    assert [d.target for d in dispatches] == targets
    assert sum(d.created for d in dispatches) == len(targets) - 1
    assert (dispatches[700].created, dispatches[700].run.pk) == (False, busy.run.pk)
    assert "is already queued; no second migration was started" in dispatches[700].message
    assert MigrationRun.objects.filter(status="queued").count() == len(targets)
    created = [d.run for d in dispatches if d.created]
    assert all(run.pk and run.created_at for run in created)
    assert MigrationRun.objects.get(pk=created[0].pk).batch == created[-1].batch


def test_a_target_listed_twice_gets_one_run(target_factory):
    target = target_factory(name="twice")

    first, second = actions.do_enqueue_runs(
        [target, target], trigger=Trigger.COMMAND, enqueue=False
    )

    assert (first.created, second.created) == (True, False)
    assert first.run.pk == second.run.pk
    assert MigrationRun.objects.filter(target=target).count() == 1
