"""Backups before migration (being written)."""


def required(record):
    return False


def backup_before_run(target, record, run, *, kind, revision):
    raise NotImplementedError
