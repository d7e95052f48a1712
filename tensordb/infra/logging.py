"""One logging set-up for every TensorDB process: plain text or JSON lines, secrets masked in both.

``tensordb processors``, ``worker``, ``serve``, ``predictor``, ``dashboard`` (and ``python -m
streams.logs``) call :func:`configure_logging` once at start-up; ``TENSORDB_LOG_FORMAT`` picks
``text`` (the default, for people) or ``json`` (one object a line, for log shippers), and
``TENSORDB_LOG_LEVEL`` the least severe level written. Every line goes to stderr.

No secret reaches a line, whatever a caller logs: the formatter replaces the password of every
URI (``mongodb://user:PASSWORD@...``), every value named as a secret (``tlsCertificateKeyFilePassword=``,
``AWS_SESSION_TOKEN:``, a driver repr's ``...password='...'``) and each secret value of the settings
(the MongoDB password and URI secret options, Kafka's secret options, the tokens) with ``***``, in the
message and in tracebacks (:func:`tensordb.config.mask_text`).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from tensordb.config import Settings, mask_text, secret_values

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Attributes every LogRecord has; anything else on a record came from ``extra=`` and goes into the JSON object.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


class _Masking:
    """Masks what :func:`~tensordb.config.mask_text` masks: URI passwords, named secret options, known secret values."""

    secrets: tuple[str, ...] = ()

    def mask(self, text: str) -> str:
        return mask_text(text, self.secrets)


class TextFormatter(_Masking, logging.Formatter):
    """``2024-05-01 12:00:00,123 INFO streams.app: processors ready``, secrets masked."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__(TEXT_FORMAT)
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return self.mask(super().format(record))


class JsonFormatter(_Masking, logging.Formatter):
    """One JSON object a line: ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``,
    ``process``, ``thread``, ``exception`` (the traceback, if any) and the record's ``extra`` fields;
    secrets masked before encoding."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(secrets)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": self.mask(record.getMessage()),
            "process": record.process,
            "thread": record.threadName,
        }
        if record.exc_info:
            entry["exception"] = self.mask(self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = self.mask(record.exc_text)
        if record.stack_info:
            entry["stack"] = self.mask(self.formatStack(record.stack_info))
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value if isinstance(value, int | float | bool | None) else self.mask(str(value))
        return json.dumps(entry, ensure_ascii=False)


def formatter(settings: Settings) -> logging.Formatter:
    """The formatter ``settings.log_format`` names, masking the settings' secrets."""
    secrets = secret_values(settings)
    return JsonFormatter(secrets) if settings.log_format == "json" else TextFormatter(secrets)


def configure_logging(settings: Settings, level: str | None = None, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record of this process to one handler on ``stream`` (stderr), formatted as
    ``settings.log_format`` says, at ``level`` (default ``settings.log_level``); returns the handler.

    Replaces the root logger's handlers (called again, it reconfigures), and makes uvicorn's loggers
    propagate to it (start uvicorn with ``log_config=None`` so it keeps them that way).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(settings))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel((level or settings.log_level).upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    return handler
