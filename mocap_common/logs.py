"""Structured logging: one JSON object per line on stderr, with request and job context.

`configure_logging` is called once per process. Handlers and domain code log through
`get_logger(__name__)`; the RPC interceptor binds `service`, `rpc`, `request_id`, and code that
works for a job binds `job` with `bind_context(job=...)`, so every line of a call carries them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.contextvars import bind_contextvars, bound_contextvars, clear_contextvars, get_contextvars

__all__ = [
    "configure_logging",
    "get_logger",
    "bind_context",
    "bound_context",
    "clear_context",
    "current_context",
]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(service: str, level: str = "info", fmt: str = "json") -> None:
    """Routes structlog and the stdlib `logging` module to stderr in one format."""
    numeric = _LEVELS.get(level.lower())
    if numeric is None:
        raise SystemExit(f"unknown log level {level!r}; use one of {', '.join(_LEVELS)}")
    renderer: Any = structlog.processors.JSONRenderer() if fmt == "json" else structlog.dev.ConsoleRenderer(colors=False)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_service(service),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_StderrLogger,
        cache_logger_on_first_use=False,
    )
    handler = _StderrHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)


class _StderrLogger:
    """Writes each rendered line to whatever sys.stderr is *now* (tests swap it)."""

    def __init__(self, *_: Any) -> None:
        pass

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stdlib handler bound to the current sys.stderr, not the one at configure time."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _: Any) -> None:
        pass


def _add_service(service: str) -> Any:
    def add(_: Any, __: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("service", service)
        return event

    return add


def get_logger(name: str | None = None) -> Any:
    return structlog.get_logger(name)


def bind_context(**values: Any) -> None:
    """Adds fields (e.g. job=...) to every log line of the current task from now on."""
    bind_contextvars(**values)


bound_context = bound_contextvars
clear_context = clear_contextvars


def current_context() -> dict[str, Any]:
    return get_contextvars()
