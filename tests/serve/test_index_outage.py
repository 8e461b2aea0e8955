"""A server whose store's index is in PostgreSQL: it rides out a dropped connection (the index opens a new
one), and while the database is down it answers 503 with a clear message, keeps running, and serves again
without a restart once the database is back."""

from __future__ import annotations

import contextlib

import httpx
import psycopg
from serve_helpers import fresh, serve_config

from tailorlm import models
from tailorlm.serve.run import background
from tailorlm.users.service import UserService


def _complete(url: str, key: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/completions",
        json={"model": "1", "prompt": "Would you curse?", "max_tokens": 2, "temperature": 0},
        headers={"Authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_the_server_rides_out_a_lost_index(tmp_path, tiny, postgres):  # postgres: skips or fails as it does
    from postgres_server import PostgresServer, binaries

    own = PostgresServer(binaries()).start()  # its own server: this test stops and starts it
    try:
        url = own.new_database()
        service = UserService(tmp_path / "store", load_base=lambda: fresh(tiny), index=url)
        service.configure(task="verbagg", base_model=models.TINY_MODEL)
        service.import_task("verbagg", users=["1"], kind="label-bias")
        assert service.train().trained == ["1"]  # a label bias: fitted in seconds
        key = service.issue_key("1")
        service.close()
        with background(serve_config(tmp_path / "store", retrain=False), base=fresh(tiny)) as server:
            first = _complete(server.url, key)
            assert first.status_code == 200, first.text
            with psycopg.connect(own.url(), autocommit=True) as admin:  # a failover, as the server sees it
                admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (url.rsplit("/", 1)[1],),
                )
            assert _complete(server.url, key).status_code == 200
            own.halt()
            down = _complete(server.url, key)
            assert down.status_code == 503, down.text
            error = down.json()["error"]
            # Retryable, and it names no address, database or driver message (the log has those).
            assert error["code"] == "index_unavailable" and "retry" in error["message"]
            assert "postgresql" not in down.text and "127.0.0.1" not in down.text
            assert down.headers.get("retry-after")
            assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
            own.resume()
            assert _complete(server.url, key).status_code == 200
    finally:
        with contextlib.suppress(Exception):
            own.stop()
