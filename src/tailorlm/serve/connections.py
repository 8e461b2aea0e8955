"""Connections the server holds, bounded before any request is read: a client has ``header_timeout``
seconds to send a request's headers (on a new connection, and again after each answer on a kept-alive
one), and at most ``max_connections`` connections are open at once, ``max_connections_per_client`` from
one address; a connection beyond either is closed as soon as it is accepted. Without these a client that
opens connections and never finishes a request (slowloris) holds them for as long as it likes, and
enough of them use up the process's file descriptors, ``/health`` included.

uvicorn has none of these bounds: its ``limit_concurrency`` still accepts and holds the connection (it
answers 503 once headers arrive, which a slow client never sends), and its keep-alive timeout stops as
soon as one byte arrives. So the bounds live in a subclass of uvicorn's own HTTP protocol; the body's
deadline is the app's (``app.Gate``).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections.abc import Callable
from typing import Any

from tailorlm.serve.config import ServeConfig

log = logging.getLogger(__name__)


class _Bounded:
    """Mixed into a uvicorn HTTP protocol class (which sets ``connections``, ``client``, ``transport``,
    ``cycle`` and ``loop``); the bounds are class attributes set by ``protocol_class``."""

    header_timeout: float
    max_connections: int
    max_per_client: int
    on_drop: Callable[[str], None]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._deadline: asyncio.TimerHandle | None = None
        host = self.client[0] if self.client else None
        same = sum(1 for other in self.connections if other.client and other.client[0] == host)
        if len(self.connections) > self.max_connections:
            self._drop("max_connections")
        elif host is not None and same > self.max_per_client:
            self._drop("max_connections_per_client")
        else:
            self._arm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._arm()  # a kept-alive connection has as long for its next request's headers

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def _arm(self) -> None:
        # A new request's headers, once complete, replace ``cycle``: the deadline only closes a connection
        # whose cycle is still the one it saw (no request started since), so it never cuts a request.
        if self._deadline is not None:
            self._deadline.cancel()
        waiting = self.cycle
        self._deadline = self.loop.call_later(self.header_timeout, self._expire, waiting)

    def _expire(self, waiting: Any) -> None:
        if self.cycle is waiting and not self.transport.is_closing():
            self._drop("header_timeout")

    def _drop(self, reason: str) -> None:
        self.on_drop(reason)
        self.transport.close()


def protocol_class(config: ServeConfig, on_drop: Callable[[str], None]) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools when installed, else h11) with ``config``'s connection bounds;
    ``on_drop(reason)`` hears of every connection closed by them."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    return type(
        f"Bounded{base.__name__}",
        (_Bounded, base),
        {
            "header_timeout": config.header_timeout,
            "max_connections": config.max_connections,
            "max_per_client": config.max_connections_per_client,
            "on_drop": staticmethod(on_drop),
        },
    )


def ensure_file_limit(config: ServeConfig) -> None:
    """Raise this process's open-file limit to what ``max_connections`` needs beside the store's files
    and the model (as far as the hard limit allows); ValueError when even the hard limit is too low."""
    need = config.max_connections + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise ValueError(
                f"--max-connections {config.max_connections} needs about {need} open files, over this "
                f"process's limit of {hard} (ulimit -n); lower --max-connections"
            )
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        log.info("raised the open-file limit from %d to %d", soft, need)
