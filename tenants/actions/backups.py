"""The backup a run took before it changed anything, on the run's record."""

from tenants.actions.saves import save_fields


def do_record_backup(run, backup):
    """Record on ``run`` the backup taken before it changed anything (a
    ``migrator.backups.Backup``): path, size, sha256, duration, and the revision it holds as the
    run's ``revision_before``. Saved at once, so the backup stays on record whatever the run
    does next."""
    save_fields(run, take_backup(run, backup))
    return run


def take_backup(run, backup):
    """Set ``backup`` on ``run`` (unsaved); return the fields."""
    run.backup_path = backup.path
    run.backup_size = backup.size
    run.backup_checksum = backup.checksum
    run.backup_duration_ms = backup.duration_ms
    run.revision_before = backup.revision or ""
    return [
        "backup_path",
        "backup_size",
        "backup_checksum",
        "backup_duration_ms",
        "revision_before",
    ]
