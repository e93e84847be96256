"""A second line of defence against leaked credentials.

Every secret value read from Vault is registered here as soon as it is read, and kept while it
is in use (``register_secret``); ``redact`` replaces any registered value in a text, and
``RedactSecretsFilter`` applies it to every log record. The first line of defence is that secret
values are wrapped (``migrator.secrets.Secret``) and never formatted into messages in the first
place.
"""

import logging
import threading
import weakref
from collections import OrderedDict, deque

from migrator import process

REDACTED = "**redacted**"
_MIN_LENGTH = 4  # shorter values would redact ordinary words

# Up to this many values, ``redact`` tries each one; beyond, it looks the text's substrings up
# by their first _MIN_LENGTH characters, so a log line costs the same with two secrets
# registered as with the thousands of a worker that has migrated a thousand tenants.
_FEW = 32

# How many values stay registered after nothing holds them any more (a password read from
# Vault, then its ``Secret`` dropped when the run ended): the most recently registered ones,
# for what is logged after a run (its error, the task's traceback). A value held by a live
# object (``register_secret(value, held_by=...)``: every ``Secret``, the Vault login's
# credentials) stays as long as that object, however many others come after it. So the registry
# holds what is in use plus this many, instead of every value the process ever read.
RECENT_KEPT = 1024

_lock = threading.Lock()
_values: set[str] = set()
_longest_first: tuple[str, ...] = ()
_by_prefix: dict[str, tuple[str, ...]] = {}  # first _MIN_LENGTH characters -> values
_holders: dict[str, int] = {}  # value -> how many live objects hold it
_recent: OrderedDict[str, None] = OrderedDict()  # unheld or not, newest last
# Values whose holder was collected. Appended by the garbage collector's callback, which may run
# in any thread, inside any code (even this module's, under _lock): emptied under the lock by
# the next registration.
_released: deque[str] = deque()


def register_secret(value: str, *, held_by: object = None) -> None:
    """Remember a secret value so that ``redact`` removes it from any text: as long as
    ``held_by`` (an object that keeps the value, e.g. a ``Secret``) lives, and for the next
    ``RECENT_KEPT`` registrations of other values."""
    if not value or len(value) < _MIN_LENGTH:
        return
    with _lock:
        _forget_released()
        _recent[value] = None
        _recent.move_to_end(value)
        if held_by is not None:
            _holders[value] = _holders.get(value, 0) + 1
            finalizer = weakref.finalize(held_by, _released.append, value)
            finalizer.atexit = False
        if value not in _values:
            _add(value)
        while len(_recent) > RECENT_KEPT:
            oldest, _ = _recent.popitem(last=False)
            if oldest not in _holders:
                _remove(oldest)


def _forget_released() -> None:
    # Under _lock.
    while _released:
        value = _released.popleft()
        left = _holders.get(value, 0) - 1
        if left > 0:
            _holders[value] = left
            continue
        _holders.pop(value, None)
        if value not in _recent and value in _values:
            _remove(value)


def _add(value: str) -> None:
    _values.add(value)
    prefix = value[:_MIN_LENGTH]
    _by_prefix[prefix] = tuple(sorted((*_by_prefix.get(prefix, ()), value), key=len, reverse=True))
    _sort_few()


def _remove(value: str) -> None:
    _values.discard(value)
    prefix = value[:_MIN_LENGTH]
    left = tuple(v for v in _by_prefix.get(prefix, ()) if v != value)
    if left:
        _by_prefix[prefix] = left
    else:
        _by_prefix.pop(prefix, None)
    _sort_few()


def _sort_few() -> None:
    global _longest_first
    _longest_first = tuple(sorted(_values, key=len, reverse=True)) if len(_values) <= _FEW else ()


def _forget_unheld() -> None:
    """Forget every value no live object holds (``process.reset()``); the held ones stay, since
    what holds them may still print them."""
    with _lock:
        _forget_released()
        for value in list(_recent):
            if value not in _holders:
                _remove(value)
        _recent.clear()


def _fresh_lock() -> None:
    # In a forked child: a thread of the parent may have held it. The values stay redacted.
    global _lock
    _lock = threading.Lock()


process.register("redaction.values", reset=_forget_unheld, after_fork=_fresh_lock)


def redact(text: str) -> str:
    """Return ``text`` with every registered secret value replaced by a marker."""
    if not text or not _values:
        return text
    if len(_values) <= _FEW:
        found = [value for value in _longest_first if value in text]
    else:
        # The text's substrings of _MIN_LENGTH characters that begin a registered value (a set
        # intersection, in C), then only those values are looked for.
        grams = {text[start : start + _MIN_LENGTH] for start in range(len(text) - _MIN_LENGTH + 1)}
        found = sorted(
            {
                value
                for prefix in grams.intersection(_by_prefix)
                for value in _by_prefix.get(prefix, ())  # one may be forgotten meanwhile
                if value in text
            },
            key=len,
            reverse=True,
        )
    for value in found:
        text = text.replace(value, REDACTED)
    return text


class RedactSecretsFilter(logging.Filter):
    """Logging filter that redacts registered secret values from the rendered message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _values:
            message = record.getMessage()
            cleaned = redact(message)
            if cleaned != message:
                record.msg, record.args = cleaned, None
            if record.exc_info and record.exc_info[1] is not None:
                text = redact(str(record.exc_info[1]))
                if text != str(record.exc_info[1]):
                    # The traceback would print the value again: keep the redacted text only.
                    record.msg = f"{record.msg} ({type(record.exc_info[1]).__name__}: {text})"
                    record.exc_info = None
                    record.exc_text = None
        return True
