"""One line per event, as logfmt: `ts=... level=info logger=... msg="version loaded" version=2`.

Fields come from `extra=` on the logging call. Configured only by __main__. With several
workers, every line says which process wrote it: `worker=0`, `worker=1`, ... or
`worker=supervisor`. A line logged while a call is handled carries its `request_id`.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from .call_context import current_request_id

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def _value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        fields = {
            "ts": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            **({} if self.worker is None else {"worker": self.worker}),
            "msg": record.getMessage(),
        }
        fields.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            fields["error"] = self.formatException(record.exc_info)
        return " ".join(f"{key}={_value(value)}" for key, value in fields.items())


class RequestIdFilter(logging.Filter):
    """Adds the current call's request ID to a record logged while the call is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "request_id" not in record.__dict__:
            request_id = current_request_id()
            if request_id:
                record.request_id = request_id
        return True


def configure_logging(level: str, worker: str | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(LogfmtFormatter(worker))
    handler.addFilter(RequestIdFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class RateLimitedLog:
    """A warning at most once per interval, saying how many it held back since the last."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self.logger = logger
        self.interval = interval
        self._last = -interval
        self._held_back = 0

    def warning(self, message: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._held_back += 1
            return
        self.logger.warning(message, extra={**fields, "since_last_line": self._held_back})
        self._last, self._held_back = now, 0
