"""Logging setup: text for people, JSON lines for log shippers."""

from __future__ import annotations

import json
import logging
import logging.config
import re
from typing import Any

import orjson
from aiohttp.http_exceptions import HttpProcessingError


class DropMalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse with a traceback quoting the raw
    request line or headers — tokens and cookies included — and any client can
    make it do so at will. The client already got its 400: drop the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


_PLAIN = re.compile(r"[\w.@:/+-]{1,256}", re.ASCII)


def quote(value: str | None) -> str:
    """``value`` (client- or app-controlled) as one token of a text log line.

    Plain ids print as they are; anything else is a JSON string with every
    control and non-ASCII character escaped, so a newline in a token claim
    or a spoofed ``tenant=x`` cannot forge a line or a field. None is ``-``.
    """
    if value is None:
        return "-"
    if _PLAIN.fullmatch(value):
        return value
    return json.dumps(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if fmt == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"main": formatter},
        "filters": {"no_malformed": {"()": DropMalformedRequests}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "main",
                "stream": "ext://sys.stderr",
                "filters": ["no_malformed"],
            }
        },
        "root": {"level": level.upper(), "handlers": ["stderr"]},
        # aiohttp's access log would be one line per request; ours is one per stream.
        "loggers": {"aiohttp.access": {"level": "WARNING"}},
    }


def setup_logging(level: str, fmt: str) -> None:
    logging.config.dictConfig(logging_config(level, fmt))
