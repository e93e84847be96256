"""Every state change of the record, as named actions (Zulip's ``zerver/actions`` style).

Admin actions, management commands, the creation signal, the HTTP API and the migration task
only call these. Each runs in a transaction, takes the acting user as a keyword where a person
acts, saves with ``update_fields``, and enqueues work with ``transaction.on_commit`` so a worker
never sees a run that was rolled back.

One module per concern; every action is importable from here (``actions.do_enqueue_runs``):

- ``dispatch``: queueing runs, in bulk, to each region's cluster (``Dispatch``).
- ``lifecycle``: a run in its worker's hands: start, heartbeat.
- ``recovery``: runs no worker finishes: abandoned in the queue, interrupted, recovered.
- ``retries``: the next attempt of a retryable failure, after its back-off.
- ``outcomes``: what a run ended with, recorded in one transaction.
- ``statuses``: where a target stands, reconciled with the current heads.
- ``verification``, ``backups``, ``credentials``: what a run's checks, backup and admin user
  leave on the record.
- ``restores``: restoring a target from a run's backup.
- ``holds``, ``cancellation``: keeping runs off a target.
- ``decommission``: retiring tenants and targets.
- ``saves``: ``save(update_fields=...)`` for the writes a worker makes on every run, in an
  UPDATE built once instead of compiled each time.
"""

from tenants.actions.backups import do_record_backup
from tenants.actions.cancellation import do_cancel_queued_runs, do_cancel_run
from tenants.actions.credentials import do_record_admin_credentials
from tenants.actions.decommission import (
    Decommission,
    do_decommission_target,
    do_decommission_tenant,
)
from tenants.actions.dispatch import (
    MIGRATION_TASK,
    Dispatch,
    broker_location,
    do_enqueue_plan,
    do_enqueue_runs,
    do_record_enqueue_failure,
)
from tenants.actions.holds import do_set_held
from tenants.actions.lifecycle import (
    HELD_BEFORE_START,
    do_heartbeat,
    do_start_run,
    worker_identity,
)
from tenants.actions.outcomes import (
    ERROR_LIMIT,
    bounded_error,
    do_record_run_failure,
    do_record_run_outcome,
    do_record_server,
)
from tenants.actions.recovery import (
    abandoned_reason,
    abandoned_runs,
    do_mark_run_abandoned,
    do_mark_run_interrupted,
    do_record_recovered_run,
    stale_runs,
)
from tenants.actions.restores import do_record_restore, do_start_restore_run
from tenants.actions.retries import do_schedule_retry, retry_delay_seconds
from tenants.actions.statuses import (
    current_heads,
    do_reconcile_statuses,
    reconcile_with_current_heads,
    target_status_for,
)
from tenants.actions.verification import do_record_verification

__all__ = [
    "ERROR_LIMIT",
    "HELD_BEFORE_START",
    "MIGRATION_TASK",
    "Decommission",
    "Dispatch",
    "abandoned_reason",
    "abandoned_runs",
    "bounded_error",
    "broker_location",
    "current_heads",
    "do_cancel_queued_runs",
    "do_cancel_run",
    "do_decommission_target",
    "do_decommission_tenant",
    "do_enqueue_plan",
    "do_enqueue_runs",
    "do_heartbeat",
    "do_mark_run_abandoned",
    "do_mark_run_interrupted",
    "do_record_admin_credentials",
    "do_record_backup",
    "do_record_enqueue_failure",
    "do_record_recovered_run",
    "do_record_restore",
    "do_record_run_failure",
    "do_record_run_outcome",
    "do_record_server",
    "do_record_verification",
    "do_reconcile_statuses",
    "do_schedule_retry",
    "do_set_held",
    "do_start_restore_run",
    "do_start_run",
    "reconcile_with_current_heads",
    "retry_delay_seconds",
    "stale_runs",
    "target_status_for",
    "worker_identity",
]
