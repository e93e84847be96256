"""Secret values never reach a log line or a recorded text, however many a worker has read."""

import secrets

from migrator import redaction


def test_a_worker_that_read_many_secrets_redacts_each_of_them_and_nothing_else():
    # More values than the few tried one by one: the lookup by prefix takes over.
    values = [f"pw-{secrets.token_hex(12)}" for _ in range(redaction._FEW * 3)]
    for value in values:
        redaction.register_secret(value)
    longer = values[7] + "-rotated"  # shares its beginning with another secret
    redaction.register_secret(longer)

    text = (
        f"Login for tenant-a failed with {values[0]}; tenant-b used {longer}, then {values[-1]}. "
        f"Only a part of one: {values[3][:12]}."
    )
    cleaned = redaction.redact(text)

    assert cleaned == (
        f"Login for tenant-a failed with {redaction.REDACTED}; tenant-b used "
        f"{redaction.REDACTED}, then {redaction.REDACTED}. Only a part of one: {values[3][:12]}."
    )
    assert redaction.redact("Nothing secret here.") == "Nothing secret here."


def test_a_long_running_worker_keeps_redacting_what_it_holds_and_forgets_the_rest():
    import gc

    from migrator.secrets import Secret

    held = Secret(f"pw-held-{secrets.token_hex(12)}")  # e.g. a run's admin password
    dropped = f"pw-dropped-{secrets.token_hex(12)}"  # read once, long ago, held by nothing
    redaction.register_secret(dropped)
    # A worker that has since read many more (a large fleet, run after run).
    for _ in range(redaction.RECENT_KEPT + 10):
        redaction.register_secret(f"pw-{secrets.token_hex(12)}")

    assert redaction.redact(f"connect as {held.reveal()}") == f"connect as {redaction.REDACTED}"
    assert redaction.redact(f"old {dropped}") == f"old {dropped}"  # the registry is bounded

    value = held.reveal()
    del held
    gc.collect()
    for _ in range(redaction.RECENT_KEPT + 10):
        redaction.register_secret(f"pw-{secrets.token_hex(12)}")
    assert redaction.redact(f"gone {value}") == f"gone {value}"
