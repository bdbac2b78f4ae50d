"""No secret in any log line: a logging filter that masks passwords in URLs (`redis://u:pw@h`),
`password=` / `token=` style settings (OONA_SIGNING_KEY=, KASMINA_API_TOKEN=, ...) and bearer
tokens, whatever logger wrote them."""

from __future__ import annotations

import logging
import re

_URL_PASSWORD = re.compile(r"(?P<head>[a-zA-Z][a-zA-Z0-9+.-]*://[^\s:/@]*:)[^\s@/]+@")
_KEY_VALUE = re.compile(r"(?P<head>(?:password|passwd|pwd|token|secret|signing_key|api_key"
                        r"|previous_keys)['\"]?\s*[=:]\s*['\"]?)[^\s&'\",;)]+", re.IGNORECASE)
# A gRPC `authorization: Bearer <token>` header, wherever it is quoted.
_BEARER = re.compile(r"(?P<head>bearer\s+)[^\s'\",;)]+", re.IGNORECASE)


def redact(text: str) -> str:
    text = _URL_PASSWORD.sub(r"\g<head>***@", text)
    text = _BEARER.sub(r"\g<head>***", text)
    return _KEY_VALUE.sub(r"\g<head>***", text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if clean != message:
            record.msg, record.args = clean, None
        return True


def install() -> None:
    """Put the filter on every handler of every logger configured so far (call again after a
    library such as uvicorn adds its own); idempotent."""
    loggers = [logging.getLogger(), *(logger for logger in logging.Logger.manager.loggerDict
                                       .values() if isinstance(logger, logging.Logger))]
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactingFilter) for f in handler.filters):
                handler.addFilter(RedactingFilter())
