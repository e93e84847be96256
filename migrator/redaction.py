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

_lock = threading.Lock()
_values: set[str] = set()


def register_secret(value: str) -> None:
    """Remember a secret value so that ``redact`` removes it from any text."""
    if value and len(value) >= _MIN_LENGTH:
        with _lock:
            _values.add(value)


def redact(text: str) -> str:
    """Return ``text`` with every registered secret value replaced by a marker."""
    if not text or not _values:
        return text
    for value in sorted(_values, key=len, reverse=True):
        if value in text:
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
