"""The process state: a forked worker shares what its parent read from disk, nothing else."""

import json
import os

import pytest

from migrator import engines, runner
from migrator.secrets import ConnectionInfo, get_secrets_manager


def in_a_forked_child(check):
    """Run ``check()`` in a child forked from this process; return what it returned (JSON)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, and leave without running pytest's clean-up
        try:
            os.write(write, json.dumps(check()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        said = answer.read()
    os.waitpid(pid, 0)
    return json.loads(said)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork() with threads running
def test_a_forked_worker_keeps_the_script_directory_and_makes_its_own_clients(vault):
    info = ConnectionInfo(provider="postgresql", host="127.0.0.1", port=5432, database="d")
    script = runner.script_directory()  # what qcluster reads before it forks its workers
    manager = get_secrets_manager()
    engine = engines.server_engine(info)

    seen = in_a_forked_child(
        lambda: {
            "script directory": runner.script_directory() is script,
            "Vault client": get_secrets_manager() is manager,
            "engine": engines.server_engine(info) is engine,
        }
    )

    assert seen == {"script directory": True, "Vault client": False, "engine": False}
    # The parent's own are untouched.
    assert get_secrets_manager() is manager and engines.server_engine(info) is engine
