"""Schema verification after migration (being written)."""


def verify_after_upgrade(target, record, run, result):
    return None
