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
