"""Logging for the servers: one line per record, the RPC's request id on every line.

    2025-01-31 12:00:00,123 INFO pllava_encoder.engine [3f2a9c01d4e7] encoded 4 frames ...

Lines go to stderr (what ``docker logs`` and the test helper capture).
"""
from __future__ import annotations

import logging
import sys

from .errors import current_request_id

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id() or "-"
        return True


class _PeerGoneFilter(logging.Filter):
    """grpc logs an ERROR with a traceback when a stream write fails because the client
    cancelled or its deadline passed (``ExecuteBatchError raised in core``): nothing went
    wrong here, and the RPC's end is logged anyway. Such records become DEBUG ones."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("grpc") and "ExecuteBatchError raised in core" in record.getMessage():
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            record.exc_info = record.exc_text = None
            return logging.getLogger().isEnabledFor(logging.DEBUG)
        return True


def setup_logging(level: str = "INFO") -> None:
    """Send every logger's records to stderr in :data:`LOG_FORMAT` at ``level``."""
    name = str(level).upper()
    if name not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_RequestIdFilter())
    handler.addFilter(_PeerGoneFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(name)
