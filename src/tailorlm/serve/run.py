"""Running a server of any role (``server.Server``): in the foreground (``tailorlm serve``, ``tailorlm perf
serve``'s server processes) or from a thread of this process (tests), always on the configured address,
loopback by default."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import uvicorn

from tailorlm import models
from tailorlm.serve.app import create_app
from tailorlm.serve.config import ServeConfig
from tailorlm.serve.connections import ensure_file_limit, protocol_class
from tailorlm.serve.server import LocalServer, Server

ServerT = TypeVar("ServerT", bound=Server)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def check_port(host: str, port: int) -> None:
    """Fail early, with a clear message, when the address is taken (before anything else is prepared)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise OSError(
                f"cannot listen on {host}:{port} ({error.strerror}); is another server there? use --port"
            ) from None


def wait_healthy(url: str, alive: Callable[[], bool], timeout: float) -> None:
    """Wait until the server at ``url`` answers ``/health`` (a server in another process); RuntimeError
    when ``alive()`` says its process ended, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server for {url} exited before it answered")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"the server for {url} did not answer /health within {timeout:g} s")


def _uvicorn(server: Server) -> uvicorn.Server:
    limits = server.config
    ensure_file_limit(limits)
    config = uvicorn.Config(
        create_app(server),
        host=limits.host,
        port=limits.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=limits.keep_alive,
        http=protocol_class(limits, lambda reason: server.metrics.dropped_connections.labels(reason).inc()),
    )
    return uvicorn.Server(config)


def serve_forever(config: ServeConfig, base: models.BaseModel | None = None) -> None:
    """``tailorlm serve``: a local server on ``config``'s address until interrupted."""
    run_forever(LocalServer(config, base))


def run_forever(server: Server) -> None:
    """Serve ``server`` (any role, built but not started) until interrupted (Ctrl-C or SIGTERM)."""
    server.start()
    try:
        _uvicorn(server).run()
    finally:
        server.stop()


@contextlib.contextmanager
def background(
    config: ServeConfig, base: models.BaseModel | None = None, timeout: float = 60.0
) -> Iterator[LocalServer]:
    """A local server answering on ``config``'s address from a thread of this process until the block
    ends (``answering``)."""
    with answering(LocalServer(config, base), timeout) as server:
        yield server


@contextlib.contextmanager
def answering(server: ServerT, timeout: float = 60.0) -> Iterator[ServerT]:
    """``server`` (any role, built but not started) answering on its configured address from a thread of
    this process until the block ends; yields it with its ``url`` set. It is stopped at the end, or when
    it does not start within ``timeout`` seconds."""
    config = server.config
    server.start()
    front = _uvicorn(server)
    thread = threading.Thread(target=front.run, name="tailorlm-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not front.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"the server did not start on {config.host}:{config.port}")
        time.sleep(0.02)
    server.url = f"http://{config.host}:{config.port}"
    try:
        yield server
    finally:
        front.should_exit = True
        thread.join(timeout=30)
        server.stop()
        logging.getLogger(__name__).debug("server on %s stopped", server.url)
