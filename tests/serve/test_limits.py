"""The server's own limits hold before any request is read: keys before bodies, failed keys throttled per
client address, rate limits per key, bodies and headers with deadlines, connections bounded in all and
per address, and a client that goes away is cancelled. Each test runs a server of its own (the limits
are settings) on loopback; a second client address is 127.0.0.2 (Linux routes all of 127/8 to lo)."""

from __future__ import annotations

import concurrent.futures
import socket
import threading
import time

import httpx
import pytest
from serve_helpers import fresh, serve_config, wait_settled

from tailorlm.serve.run import background
from tailorlm.serve.scheduler import SchedulerConfig

USER = "lora-user-0"


@pytest.fixture(scope="module")
def limited(store_users, tiny):
    config = serve_config(
        store_users.root,
        retrain=False,
        auth_failure_rate=0.2,
        auth_failure_burst=3.0,
        header_timeout=0.5,
        body_timeout=0.5,
        max_connections=32,
        max_connections_per_client=4,
    )
    with background(config, base=fresh(tiny)) as server:
        yield server


def client_from(address: str, url: str, **options) -> httpx.Client:
    return httpx.Client(
        base_url=url, transport=httpx.HTTPTransport(local_address=address), timeout=30, **options
    )


def raw(server, address: str = "127.0.0.1") -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10, source_address=(address, 0))
    return sock


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (what it sends first is read and dropped)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_the_key_is_checked_before_the_body(limited):
    with client_from("127.0.0.3", limited.url) as http:
        bad_json = http.post(
            "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert bad_json.status_code == 401  # not a 400 that would describe the schema
        huge = http.post("/v1/completions", content=b"x" * (2 << 20))
        assert huge.status_code == 401  # refused before 2 MB were read
        assert "model" not in bad_json.text and "prompt" not in bad_json.text


def test_failed_keys_are_throttled_per_address(limited, store_users):
    good = {"Authorization": f"Bearer {store_users.keys[USER]}"}
    with client_from("127.0.0.4", limited.url) as attacker, client_from("127.0.0.5", limited.url) as other:
        codes = [
            attacker.get("/v1/models", headers={"Authorization": f"Bearer tlm-u-guess{i}"}).status_code
            for i in range(5)
        ]
        assert codes[:3] == [401, 401, 401] and codes[3:] == [429, 429], codes
        throttled = attacker.get("/v1/models", headers=good)  # not even a right key gets in meanwhile
        assert throttled.status_code == 429 and throttled.json()["error"]["code"] == "auth_throttled"
        assert int(throttled.headers["Retry-After"]) >= 1
        assert other.get("/v1/models", headers=good).status_code == 200  # another address is not touched
    assert limited.metrics.auth_failures._value.get() >= 3


def test_a_half_sent_header_is_dropped_and_others_are_served(limited):
    sock = raw(limited, "127.0.0.6")
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bea")
    started = time.monotonic()
    assert closed_within(sock, 5.0)
    assert time.monotonic() - started < 3.0  # the header deadline is 0.5 s
    sock.close()
    assert httpx.get(f"{limited.url}/health", timeout=10).status_code == 200
    # A kept-alive connection gets the same deadline for its next request's headers.
    sock = raw(limited, "127.0.0.6")
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    sock.settimeout(5)
    assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.sendall(b"GET /hea")
    assert closed_within(sock, 5.0)
    sock.close()


def test_a_body_that_never_finishes_gets_408(limited, store_users):
    sock = raw(limited, "127.0.0.7")
    key = store_users.keys[USER]
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
        'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"model":'.encode()
    )
    sock.settimeout(5)
    answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    sock.close()


def test_connections_are_bounded_per_address(limited):
    held = [raw(limited, "127.0.0.8") for _ in range(4)]
    extra = raw(limited, "127.0.0.8")
    assert closed_within(extra, 0.4)  # closed at once, well before the 0.5 s header deadline
    with client_from("127.0.0.9", limited.url) as other:
        assert other.get("/health").status_code == 200
    for sock in [*held, extra]:
        sock.close()
    dropped = limited.metrics.dropped_connections.labels("max_connections_per_client")._value.get()
    assert dropped >= 1


def test_a_client_that_goes_away_is_cancelled(limited, store_users):
    cancelled = threading.Event()
    scheduler = limited.scheduler
    original = scheduler.cancel

    def cancel(job):
        cancelled.set()
        original(job)

    scheduler.cancel = cancel
    try:
        sock = raw(limited)
        body = (
            f'{{"model": "{USER}", "prompt": "go on", "max_tokens": 200, "ignore_eos": true, '
            '"temperature": 0}'
        ).encode()
        sock.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {store_users.keys[USER]}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(0.05)
        sock.close()
        assert cancelled.wait(10), "the abandoned request was not cancelled"
    finally:
        scheduler.cancel = original
    wait_settled(limited)


def test_rate_limits_are_per_key(store_users, tiny):
    from tailorlm.users.service import UserService

    service = UserService(store_users.root)
    second_key = service.issue_key(USER)
    admins = [service.issue_key(None, admin=True) for _ in range(2)]
    service.close()
    with background(
        serve_config(store_users.root, rate_limit=1.0, retrain=False), base=fresh(tiny)
    ) as server:

        def codes(key: str, times: int = 4) -> list[int]:
            headers = {"Authorization": f"Bearer {key}"}
            return [
                httpx.get(f"{server.url}/v1/models", headers=headers, timeout=30).status_code
                for _ in range(times)
            ]

        assert 429 in codes(store_users.keys[USER])
        assert codes(second_key, 2) == [200, 200]  # the same user's other key has its own bucket
        assert 429 in codes(admins[0])
        assert codes(admins[1], 2) == [200, 200]


def test_one_users_flood_leaves_the_queue_to_others(store_users, tiny):
    config = serve_config(
        store_users.root,
        retrain=False,
        scheduler=SchedulerConfig(max_batch=1, wait_ms=0.0, max_queue=64, max_user_queue=2),
    )
    with background(config, base=fresh(tiny)) as server:

        def call(user: str) -> httpx.Response:
            body = {"model": user, "prompt": "a long answer", "max_tokens": 60, "ignore_eos": True}
            headers = {"Authorization": f"Bearer {store_users.keys[user]}"}
            return httpx.post(f"{server.url}/v1/completions", json=body, headers=headers, timeout=120)

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            flood = [pool.submit(call, USER) for _ in range(8)]
            time.sleep(0.2)
            other = pool.submit(call, "ia3-user-0")
            codes = sorted(answer.result().status_code for answer in flood)
            assert other.result().status_code == 200
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        refused = next(a.result() for a in flood if a.result().status_code == 429)
        assert refused.json()["error"]["code"] == "user_queue_full"
