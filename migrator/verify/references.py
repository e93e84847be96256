"""Reference schemas: what an upgrade to a revision gives on a fresh database of a provider,
built once on a scratch database and kept in this process (registered with
``migrator.process``) and in files under DATA_DIR for every worker sharing it (a lock file makes
the others wait for the first build); and the reflected schemas shared the same way."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import secrets as random
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from migrator import engines, process, runner, schema
from migrator.exceptions import VerificationError
from migrator.verify.scratch import _driver_errors, _scratch_setting, scratch_target

logger = logging.getLogger("migrator.verify")


@dataclass(frozen=True)
class Reference:
    """The schema an upgrade to ``revision`` gives on a fresh database of ``provider``."""

    provider: str
    revision: str | None
    script_hash: str
    schema: dict
    fingerprint: str


_references: dict[tuple[str, str, str], Reference] = {}
_lineage_hashes: dict[tuple[str, str], str] = {}
_references_lock = threading.Lock()
# How many references this process built, by (provider, revision): each should be built once.
reference_builds: Counter = Counter()


def _forget_references() -> None:
    """Forget the references and hashes kept in this process (``process.reset()``)."""
    with _references_lock:
        _references.clear()
        _lineage_hashes.clear()
        reference_builds.clear()


def _fresh_references_lock() -> None:
    # In a forked child: a thread of the parent may have held it. The references stay.
    global _references_lock
    _references_lock = threading.Lock()


process.register("verify.references", reset=_forget_references, after_fork=_fresh_references_lock)


def reference_for(provider: str, revision: str | None, *, script_location=None) -> Reference:
    """The reference schema for ``revision`` on ``provider``: from this process, else from the
    file cache under DATA_DIR/schema-references, else built on a scratch database (once: a
    lock file makes other workers wait for the first one's result).

    Raises ``NoScratchDatabase`` when it must be built and no scratch server is configured,
    ``VerificationError`` (or another ``MigratorError``) when building fails.
    """
    if not revision:
        empty = schema.empty()
        return Reference(provider, None, "", empty, schema.fingerprint(empty))
    script = runner.script_directory(script_location)
    digest = lineage_hash(script, revision)
    key = (provider, revision, digest)
    with _references_lock:
        cached = _references.get(key)
        if cached is not None:
            return cached
        path = _reference_path(provider, revision, digest)
        data = _read_reference(path)
        if data is None:
            _scratch_setting(provider)  # fail early, before taking any lock
            with _file_lock(path.parent / ".build.lock"):  # one build at a time per provider
                data = _read_reference(path)  # another worker may have built it meanwhile
                if data is None:
                    built = build_reference(provider, revision, script_location=script.dir)
                    data = {
                        "provider": provider,
                        "revision": revision,
                        "script_hash": digest,
                        "built_at": timezone.now().isoformat(),
                        "fingerprint": schema.fingerprint(built),
                        "schema": built,
                    }
                    _write_reference(path, data)
        reference = Reference(provider, revision, digest, data["schema"], data["fingerprint"])
        _references[key] = reference
        return reference


def build_reference(provider: str, revision: str, *, script_location=None) -> dict:
    """Migrate a throw-away database of ``provider`` to ``revision`` and return its normalised
    schema. The scratch database is dropped afterwards, whatever happens."""
    logger.info("Building the reference schema of %s for %s", revision, provider)
    reference_builds[(provider, revision)] += 1
    with scratch_target(provider) as target:
        for head in revision.split(","):
            runner.upgrade(target, head, script_location=script_location)
        with _driver_errors(target), engines.connect(target) as connection:
            return schema.reflect(connection)


def lineage_hash(script, revision: str) -> str:
    """sha256 of the files of ``revision`` and every revision below it, and of ``env.py``: what
    a reference depends on. Raises ``VerificationError`` for a revision the script directory
    does not have."""
    key = (script.dir, revision)
    cached = _lineage_hashes.get(key)
    if cached is not None:
        return cached
    found = {}
    try:
        for head in revision.split(","):
            for step in script.iterate_revisions(head, "base"):
                found[step.revision] = step.path
    except Exception as exc:  # noqa: BLE001 - Alembic raises several kinds for an unknown id
        raise VerificationError(
            f"revision {revision} is not in the script directory ({script.dir}): {exc}"
        ) from None
    hasher = hashlib.sha256()
    for revision_id, path in sorted(found.items()):
        hasher.update(revision_id.encode() + b"\0" + Path(path).read_bytes() + b"\0")
    env_py = Path(script.env_py_location)
    if env_py.exists():
        hasher.update(env_py.read_bytes())
    digest = _lineage_hashes[key] = hasher.hexdigest()
    return digest


class _SharedReflections:
    """Normalised schemas by catalog digest (``schema.reflect``), one file each under
    ``DATA_DIR/reflected-schemas``, for the processes sharing DATA_DIR: each qcluster worker
    used to run the inspector's queries on its first target (tens of milliseconds of CPU), and
    again after every recycle. A digest names its schema whatever the database, so a file is
    never stale; an unreadable one is read again from the database."""

    def path(self, digest: str) -> Path:
        return Path(settings.DATA_DIR) / "reflected-schemas" / f"{digest}.json"

    def get(self, digest: str) -> str | None:
        try:
            text = self.path(digest).read_text()
            json.loads(text)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            logger.warning("Ignoring the unreadable schema file %s", self.path(digest))
            return None
        return text

    def put(self, digest: str, text: str) -> None:
        _write_text(self.path(digest), text)


shared_reflections = _SharedReflections()


def _reference_path(provider: str, revision: str, digest: str) -> Path:
    name = revision.replace(",", "+").replace("/", "_")
    return Path(settings.DATA_DIR) / "schema-references" / provider / f"{name}-{digest[:16]}.json"


def _read_reference(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        logger.warning("Ignoring the unreadable reference file %s", path)
        return None
    if not isinstance(data, dict) or "schema" not in data or "fingerprint" not in data:
        return None
    return data


def _write_reference(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=1, sort_keys=True))


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{random.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial.write_text(text)
        partial.replace(path)  # atomic: a reader sees the whole file or none
    except OSError as exc:
        # What it holds still serves this process; other workers will make their own.
        logger.warning("Cannot write %s: %s", path, exc)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between the processes sharing DATA_DIR (flock; none where there is
    no fcntl, and then two workers may both build a reference, which is harmless)."""
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")  # closed by the with-block below
    except (ImportError, OSError):  # not POSIX, or DATA_DIR is read-only: build without a lock
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
