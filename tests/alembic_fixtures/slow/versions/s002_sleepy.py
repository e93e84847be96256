"""Test revision s002_sleepy: signals that it runs, then holds the run (and its lock) a while."""

import ctypes
import os
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "s002_sleepy"
down_revision = "s001_first"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("sleepy_things", sa.Column("id", sa.Integer(), primary_key=True))
    signal = os.environ.get("MIGRATOR_TEST_SIGNAL")
    if signal:
        Path(signal).touch()
    time.sleep(float(os.environ.get("MIGRATOR_TEST_SLEEP", "0")))
    # A step that holds the GIL this long (libc's sleep() through PyDLL, which keeps the GIL),
    # as a long regex or a C extension does: no other thread of the process runs meanwhile.
    hold = int(os.environ.get("MIGRATOR_TEST_HOLD_GIL", "0"))
    if hold:
        ctypes.PyDLL(None).sleep(hold)
    # How a worker can end without an outcome (tests/test_queue.py).
    end = os.environ.get("MIGRATOR_TEST_END", "")
    if end == "os._exit":
        os._exit(3)
    elif end == "sys.exit":
        sys.exit(3)
    elif end == "KeyboardInterrupt":
        raise KeyboardInterrupt
    elif end == "segfault":
        ctypes.string_at(0)


def downgrade() -> None:
    op.drop_table("sleepy_things")
