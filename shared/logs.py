"""Structured logging for every service, with the request id of the RPC being served on each line.

The request id lives in a context variable that the server interceptor sets, so log lines written
anywhere below a handler (batcher, model code) carry it without passing it around.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import time

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: what log shippers (Loki, Cloud Logging) parse without rules."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "request_id": getattr(record, "request_id", "-"),
            "msg": record.getMessage(),
        }
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


def configure_logging(service: str, level: str | None = None, fmt: str | None = None) -> None:
    """Set up the root logger once per process: text for people, JSON for machines.

    ``DRAMATURG_LOG_FORMAT=json`` selects JSON; ``DRAMATURG_LOG_LEVEL`` the level.
    """
    level = (level or os.environ.get("DRAMATURG_LOG_LEVEL", "INFO")).upper()
    fmt = fmt or os.environ.get("DRAMATURG_LOG_FORMAT", "text")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)-7s {service} [%(request_id)s] %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "matplotlib", "PIL", "fsspec", "numba", "speechbrain", "lightning"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
