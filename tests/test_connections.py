"""Connections nobody uses must not take the server off the air: a cap that sheds idle ones, a deadline and a size
limit for request heads. Raw sockets against a live server, as a slowloris client would do it."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_server import LiveServer, app_process, serve

ERROR_KEYS = {"message", "type", "param", "code"}
HALF_A_HEAD = b"GET /health HTTP/1.1\r\nHost: example\r\nX-Slow: "


def open_sockets(url: str, count: int, send: bytes = b"") -> list[socket.socket]:
    host, port = url.removeprefix("http://").split(":")
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((host, int(port)), timeout=10)
        if send:
            sock.sendall(send)
        sockets.append(sock)
    return sockets


def closed_by_server(sock: socket.socket, wait_s: float) -> bytes | None:
    """What the server sent before closing `sock` (b"" for nothing), or None if it is still open after `wait_s`."""
    sock.settimeout(wait_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


def still_served(url: str) -> None:
    """A probe and a real request from a fresh client, as an orchestrator and a user would send them."""
    with httpx.Client(base_url=url, timeout=30) as client:
        assert client.get("/health").status_code == 200
        generated = client.post("/generate", json={"prompt": "Hello", "max_new_tokens": 4})
        assert generated.status_code == 200, generated.text


def error_of(raw_response: bytes, status: int) -> dict[str, Any]:
    head, _, body = raw_response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), raw_response[:200]
    error: dict[str, Any] = json.loads(body)["error"]
    assert set(error) == ERROR_KEYS
    return error


@contextlib.contextmanager
def closing(sockets: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def capped(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_llama_dir, max_connections=40, header_timeout_s=60)) as live:
        yield live


def test_idle_connections_past_the_cap_are_shed_while_requests_are_served(
    capped: LiveServer, caplog: pytest.LogCaptureFixture
) -> None:
    cap = capped.app.state.settings.max_connections
    with closing(open_sockets(capped.url, 150)) as silent, closing(open_sockets(capped.url, 150, HALF_A_HEAD)) as slow:
        still_served(capped.url)
        shed = [sock for sock in silent + slow if closed_by_server(sock, 0.05) is not None]
        print(f"\nconnections: opened 300 idle, the server shed {len(shed)} (cap {cap})")
        assert len(shed) >= 300 - cap
        # the oldest idle ones went first: the silent ones, opened before the slow ones
        assert sum(1 for sock in silent if sock in shed) == 150
    assert f"MAX_CONNECTIONS={cap} reached" in caplog.text  # an operator sees it in the log


def test_a_connection_in_the_middle_of_a_request_is_never_shed(capped: LiveServer) -> None:
    cap = capped.app.state.settings.max_connections
    with httpx.Client(base_url=capped.url, timeout=60) as client:
        body = {"prompt": "Tell me a story", "max_new_tokens": 200, "temperature": 1, "stream": True}
        with client.stream("POST", "/generate", json=body) as stream:
            lines = stream.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            with closing(open_sockets(capped.url, 2 * cap)):
                still_served(capped.url)
            events = [line for line in lines if line.startswith("data:")]
    assert '"type":"done"' in events[-1]


@pytest.fixture(scope="module")
def impatient(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_llama_dir, header_timeout_s=1)) as live:
        yield live


def test_a_head_that_never_finishes_gets_408_and_is_closed(impatient: LiveServer) -> None:
    with closing([*open_sockets(impatient.url, 1, HALF_A_HEAD), *open_sockets(impatient.url, 1)]) as (slow, silent):
        answer = closed_by_server(slow, wait_s=30)
        assert answer is not None, "a half-sent request head kept its connection"
        assert "HEADER_TIMEOUT_S" in error_of(answer, 408)["message"]
        assert closed_by_server(silent, wait_s=30) == b""  # connected and never spoke: closed without a word
    still_served(impatient.url)


def test_a_head_arriving_slowly_but_in_time_is_served(impatient: LiveServer) -> None:
    with closing(open_sockets(impatient.url, 1)) as (sock,):
        for piece in (b"GET /health HTTP/1.1\r\n", b"Host: example\r\n", b"Connection: close\r\n\r\n"):
            time.sleep(0.2)
            sock.sendall(piece)
        answer = closed_by_server(sock, wait_s=30)
    assert answer is not None
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_request_that_runs_long_is_not_cut_by_the_head_deadline(impatient: LiveServer) -> None:
    """A long answer (here the playground's heartbeat stream, which an open tab holds) is no slow head."""
    with closing(open_sockets(impatient.url, 1, b"GET /gradio_api/heartbeat/a-tab HTTP/1.1\r\nHost: x\r\n\r\n")) as (
        sock,
    ):
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        time.sleep(3 * impatient.app.state.settings.header_timeout_s)
        assert closed_by_server(sock, wait_s=0.5) is None, "the server closed a connection whose request was running"


def test_a_huge_head_gets_431(impatient: LiveServer) -> None:
    with closing(open_sockets(impatient.url, 1, HALF_A_HEAD)) as (sock,):
        with contextlib.suppress(ConnectionError):
            for index in range(200):
                sock.sendall(b"a" * 1000 + f"\r\nX-Pad-{index}: ".encode())
        answer = closed_by_server(sock, wait_s=30)
    assert answer is not None
    assert "larger than" in error_of(answer, 431)["message"]
    still_served(impatient.url)


def test_the_process_stays_on_the_air_past_its_file_descriptor_limit(tiny_llama_dir: Path) -> None:
    """As the attack that took /health off the air, scaled down: more idle connections than the process has file
    descriptors (1,024, the common default), against `python app.py` with its default settings."""
    limit = 1024

    def lower_the_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with app_process({"MODEL_ID": str(tiny_llama_dir)}, preexec_fn=lower_the_limit) as (_, url):
        sockets: list[socket.socket] = []
        with closing(sockets):
            for _ in range(limit + 300):
                with contextlib.suppress(OSError):
                    sockets.extend(open_sockets(url, 1, HALF_A_HEAD))
            still_served(url)
