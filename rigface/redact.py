"""Credentials inside URLs (``https://user:pw@host``, ``s3://key:secret@bucket``) never reach a log line, an
MLflow param or tag, an error message or a Ray runtime_env: one regex, used wherever such text leaves the
process."""

from __future__ import annotations

import logging
import re
from typing import Any

# scheme://USER:PASSWORD@ (the password runs to the token's last '@': AWS secrets hold '/', passwords '@'),
# or scheme://TOKEN@. Where a port and a path with an '@' look alike, it masks too much, never too little.
_URL_USERINFO = re.compile(
    r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/@:'\"<>]+:[^\s'\"<>]*|[^\s/@:'\"<>]+)@")
MASK = "***"


def redact(text: Any) -> str:
    """``text`` as a string with every URL's user:password replaced by ``***``."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", str(text))


def has_url_credentials(text: str) -> bool:
    return bool(_URL_USERINFO.search(text))


class RedactingFilter(logging.Filter):
    """A handler filter that redacts URL credentials in every record it lets through."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install_log_redaction(logger: logging.Logger | None = None) -> None:
    """Attach one RedactingFilter to every handler of ``logger`` (the root logger by default)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
