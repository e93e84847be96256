"""Running a provider's command-line backup tools (pg_dump, mysqldump, ...) and naming the
files they write: what the provider modules' backup functions share."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from django.conf import settings

from migrator.exceptions import BackupFailed, MigratorError
from migrator.redaction import redact

if TYPE_CHECKING:
    from migrator.secrets import ConnectionInfo
    from migrator.targets import Target

_STAMP = "%Y%m%dT%H%M%SZ"
_STDERR_CHARS = 1500


def backup_file_name(run_id: int, extension: str, *, now: datetime | None = None) -> str:
    """``<UTC timestamp>-run<run_id>.<extension>``, e.g. ``20250106T091500Z-run17.dump``."""
    now = now or datetime.now(tz=UTC)
    return f"{now.astimezone(UTC).strftime(_STAMP)}-run{run_id}.{extension}"


@contextmanager
def new_file(path: Path) -> Iterator:
    """A new file at ``path`` readable and writable by this user only (0600), open for writing."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        yield file


def find_tool(target: Target, error: type[MigratorError], *names: str, package: str) -> str:
    """The full path of the first of ``names`` on PATH."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    raise error(
        f"{names[0]} is not installed on this host (not on PATH), so {target.name} cannot be "
        f"backed up or restored: install {package}."
    )


def run_tool(
    target: Target,
    tool: str,
    argv: list[str],
    *,
    env: dict[str, str],
    error: type[MigratorError],
    doing: str,
    hint: str,
    stdin=None,
    stdout=None,
) -> subprocess.CompletedProcess:
    """Run ``argv`` under MIGRATION_TASK_TIMEOUT; raise ``error`` naming the tool, its exit
    status and the end of its error output (redacted) when it fails."""
    timeout = settings.MIGRATION_TASK_TIMEOUT
    try:
        completed = subprocess.run(
            argv,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=stdout if stdout is not None else subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise error(
            f"{doing} {target.name} failed: {tool} did not finish within {timeout}s "
            f"(MIGRATION_TASK_TIMEOUT) and was stopped. {hint}"
        ) from None
    except OSError as exc:
        raise error(
            f"{doing} {target.name} failed: {tool} ({argv[0]}) could not be started "
            f"({exc.strerror or type(exc).__name__})."
        ) from None
    if completed.returncode != 0:
        if completed.returncode < 0:
            status = f"was killed by signal {-completed.returncode}"
        else:
            status = f"exited with status {completed.returncode}"
        said = _tool_output(completed.stderr, target.connection)
        raise error(
            f"{doing} {target.name} failed: {tool} {status}"
            + (f": {said}" if said else " and said nothing")
            + (f". {hint}" if hint else ".")
        )
    return completed


def _tool_output(stderr: bytes, info: ConnectionInfo) -> str:
    """The end of a tool's error output on one line, without any secret."""
    text = " ".join(stderr.decode(errors="replace").split())
    if info.password is not None and info.password.reveal():
        text = text.replace(info.password.reveal(), "**redacted**")
    text = redact(text)
    if len(text) > _STDERR_CHARS:
        text = "..." + text[-_STDERR_CHARS:]
    return text.rstrip(".")


def not_empty(target: Target, tool: str, path: Path) -> None:
    if path.stat().st_size == 0:
        raise BackupFailed(
            f"Backing up {target.name} failed: {tool} exited with status 0 but wrote nothing. "
            f"Check that {tool} on PATH is the real client."
        )
