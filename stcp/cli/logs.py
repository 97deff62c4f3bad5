"""Where the server's log records go (`stcp serve --log-format text|json -v -q`): stderr, so
a terminal, a redirect and journald (through a unit's stderr) all get the same lines.

The server layer logs through the standard logging module ("stcp.server", records with
their fields in `record.fields`, see stcp.server.ConnectionLog); only the CLI configures it.
text: `2026-12-01T20:05:00.123Z info connection closed peer=127.0.0.1:40000 cid=1a2b3c4d ...`
(logfmt: grep and awk friendly); json: one object per line with the same fields.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Dict, TextIO

LEVELS = (logging.ERROR, logging.WARNING, logging.INFO, logging.DEBUG)
DEFAULT = 2     # the server's records at INFO: a line per connection; -q: warnings; -qq: errors


def _time(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


def _fields(record: logging.LogRecord) -> Dict[str, Any]:
    return dict(getattr(record, "fields", None) or {})


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text)
    return text


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        pairs = " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())
        return f"{_time(record)} {record.levelname.lower()} {record.getMessage()}" + (f" {pairs}" if pairs else "")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _time(record), "level": record.levelname.lower(), "msg": record.getMessage(),
                 **_fields(record)}
        return json.dumps(entry, default=str)


def setup_logging(log_format: str = "text", verbosity: int = 0, stream: TextIO = sys.stderr) -> None:
    """Send the "stcp" loggers' records to stream; verbosity is the count of -v minus -q.

    The server's records ("stcp.server") show at INFO and above by default; the other
    modules' (the datapaths' and the exporter's notes) at WARNING, as without a handler;
    -v shows their INFO too and the server's DEBUG, -vv everything."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    logger = logging.getLogger("stcp")
    logger.handlers[:] = [handler]
    logger.propagate = False
    server = max(0, min(len(LEVELS) - 1, DEFAULT + verbosity))
    others = min(len(LEVELS) - 1, DEFAULT - 1 + verbosity) if verbosity > 0 else min(DEFAULT - 1, server)
    logger.setLevel(LEVELS[others])
    logging.getLogger("stcp.server").setLevel(LEVELS[server])
