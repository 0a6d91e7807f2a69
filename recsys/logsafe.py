"""Keep secrets out of log output.

Libraries log what they are given: kafka-python's admin client logs its whole configuration,
SASL password included, at DEBUG; a connection error may quote a database URL with its password.
:func:`install_secret_filter` puts a :class:`SecretFilter` on the root logger's handlers, so
every record any logger sends through them is redacted before it is written: the known secret
values (the SASL password, the store URL's password: :func:`settings_secrets`), the password of
any ``scheme://user:password@host`` URL, and the value of ``password=...``-like pairs.

Handlers are where records from every logger meet (a filter on a logger sees only what that
logger itself logs), so install the filter after the handlers exist: right after
``logging.basicConfig`` in the worker's logging set-up. Handlers added later are not covered.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import unquote, urlsplit

from recsys.config import HIDDEN, Settings, redact_urls

# key=value, key: value, 'key': 'value', "key": "value" where the key names a secret (as in a
# config dict's repr, a JSON body, a connection string or an environment dump). Also matches
# e.g. "sasl_plain_password" and "password_file": hiding a path there costs little.
_KEY_VALUE = re.compile(
    r"(?P<key>[\w.-]*(?:password|passwd|secret|api[_-]?key|credential"
    r"|auth[_-]?token|access[_-]?token)[\w.-]*)"
    r"(?P<sep>['\"]?\s*[:=]\s*)"
    r"(?P<value>'[^']*'|\"[^\"]*\"|[^\s,;&'\"})\]]+)",
    re.IGNORECASE,
)
# Replacing a very short known value would mangle unrelated text; such a value is still hidden by
# the URL and key=value patterns wherever it appears in those shapes.
MIN_SECRET_LENGTH = 4


def _hide_value(m: re.Match[str]) -> str:
    value = m["value"]
    quote = value[0] if value[0] in "'\"" else ""
    return f"{m['key']}{m['sep']}{quote}{HIDDEN}{quote}"


class SecretFilter(logging.Filter):
    """A handler filter that redacts secrets from a record's message, traceback and stack.

    It rewrites the record in place (message formatted once, then redacted) and always lets it
    through: hiding a secret must not hide the event.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        """Also redact these values, as written and in the forms logs quote them in."""
        known = set(self._secrets)
        for s in secrets:
            # URL-decoded (from a URL), escaped as in a str's repr (a config dict's repr) and as
            # in a bytes repr (kafka-python's DEBUG dump of the raw SASL authenticate request).
            forms = (s, unquote(s), repr(s)[1:-1], repr(s.encode())[2:-1])
            for form in forms:
                if len(form) >= MIN_SECRET_LENGTH:
                    known.add(form)
        # Longest first, so a secret containing another is replaced whole.
        self._secrets = sorted(known, key=len, reverse=True)

    def redact(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, HIDDEN)
        return _KEY_VALUE.sub(_hide_value, redact_urls(text))

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: the handler reports it (handleError)
            return True
        redacted = self.redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            # Formatters reuse exc_text when it is set, so the traceback is written redacted.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def install_secret_filter(secrets: Iterable[str] = ()) -> SecretFilter:
    """Redact ``secrets`` (plus URL passwords and ``password=...`` pairs) in every record that
    reaches the root logger's current handlers; returns the filter.

    Calling it again adds the new secrets to the filter already installed.
    """
    handlers = logging.getLogger().handlers
    installed = next(
        (f for h in handlers for f in h.filters if isinstance(f, SecretFilter)),
        None,
    )
    filt = installed if installed is not None else SecretFilter()
    filt.add(secrets)
    for h in handlers:
        if filt not in h.filters:
            h.addFilter(filt)
    return filt


def settings_secrets(settings: Settings) -> list[str]:
    """The secret values in ``settings``: the SASL password (from the variable or its file) and
    the password of the store URL."""
    out = []
    password = settings.kafka.client_kwargs().get("sasl_plain_password")
    if password:
        out.append(str(password))
    try:
        url_password = urlsplit(settings.store.url).password
    except ValueError:  # a malformed URL (bad port): its password is still hidden by pattern
        url_password = None
    if url_password:
        out.append(url_password)
    return out
