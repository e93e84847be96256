"""A second line of defence against leaked credentials.

Every secret value read from Vault is registered here as soon as it is read; ``redact`` replaces
any registered value in a text, and ``RedactSecretsFilter`` applies it to every log record. The
first line of defence is that secret values are wrapped (``migrator.secrets.Secret``) and never
formatted into messages in the first place.
"""

import logging
import threading

REDACTED = "**redacted**"
_MIN_LENGTH = 4  # shorter values would redact ordinary words

# Up to this many values, ``redact`` tries each one; beyond, it looks the text's substrings up
# by their first _MIN_LENGTH characters, so a log line costs the same with two secrets
# registered as with the two thousand of a worker that has migrated a thousand tenants.
_FEW = 32

_lock = threading.Lock()
_values: set[str] = set()
_longest_first: tuple[str, ...] = ()
_by_prefix: dict[str, tuple[str, ...]] = {}  # first _MIN_LENGTH characters -> values


def register_secret(value: str) -> None:
    """Remember a secret value so that ``redact`` removes it from any text."""
    global _longest_first
    if value and len(value) >= _MIN_LENGTH:
        with _lock:
            if value in _values:
                return
            _values.add(value)
            if len(_values) <= _FEW:
                _longest_first = tuple(sorted(_values, key=len, reverse=True))
            prefix = value[:_MIN_LENGTH]
            _by_prefix[prefix] = tuple(
                sorted((*_by_prefix.get(prefix, ()), value), key=len, reverse=True)
            )


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
                for value in _by_prefix[prefix]
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
