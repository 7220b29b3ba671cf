"""The HTTP edge as an attacker sees it, over real HTTP against a live server: CORS, paths and methods nobody serves,
uploads, key guessing, and what the always-open routes give away."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.live_server import LiveServer, serve

ERROR_KEYS = {"message", "type", "param", "code"}
# Any real deployment (a Space, a VM behind a domain): Gradio's own CORS layer trusted every Origin for such a Host.
PUBLIC_HOST = "llm.example.org"
FOREIGN_ORIGINS = ["https://evil.example", "null", "http://localhost:3000"]
LISTED_ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_llama_dir, max_new_tokens=16)) as live:
        yield live


@pytest.fixture(scope="module")
def cors_server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_llama_dir, max_new_tokens=16, cors_origins=[LISTED_ORIGIN])) as live:
        yield live


def assert_error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS
    assert error["code"] == status
    return error


# ----- CORS ---------------------------------------------------------------------------------------------------------

# Gradio's routes (the session token among them), the REST and the OpenAI routes.
SIMPLE_REQUESTS = [
    ("GET", "/gradio_api/token", None),
    ("GET", "/config", None),
    ("GET", "/gradio_api/info", None),
    ("GET", "/health", None),
    ("GET", "/v1/models", None),
    ("POST", "/tokenize", {"prompt": "hello"}),
]
PREFLIGHTS = ["/v1/chat/completions", "/v1/completions", "/generate", "/tokenize", "/gradio_api/queue/join"]


def granted(response: httpx.Response) -> dict[str, str]:
    return {name: value for name, value in response.headers.items() if name.startswith("access-control-allow")}


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
@pytest.mark.parametrize(("method", "path", "body"), SIMPLE_REQUESTS, ids=[p for _, p, _ in SIMPLE_REQUESTS])
def test_no_cors_grant_to_a_foreign_origin(http: httpx.Client, method: str, path: str, body: Any, origin: str) -> None:
    response = http.request(method, path, json=body, headers={"Host": PUBLIC_HOST, "Origin": origin})
    assert response.status_code == 200, response.text[:300]
    assert granted(response) == {}


@pytest.mark.parametrize("origin", FOREIGN_ORIGINS)
@pytest.mark.parametrize("path", PREFLIGHTS)
def test_preflights_from_a_foreign_origin_fail(http: httpx.Client, path: str, origin: str) -> None:
    headers = {
        "Host": PUBLIC_HOST,
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization",
    }
    response = http.options(path, headers=headers)
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers
    assert "access-control-allow-credentials" not in response.headers


def test_a_listed_origin_may_call_the_api_and_no_other(cors_server: LiveServer) -> None:
    with httpx.Client(base_url=cors_server.url, timeout=30, headers={"Host": PUBLIC_HOST}) as client:
        preflight = client.options(
            "/v1/chat/completions",
            headers={"Origin": LISTED_ORIGIN, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "content-type, authorization"},
        )  # fmt: skip
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == LISTED_ORIGIN
        listed = client.get("/v1/models", headers={"Origin": LISTED_ORIGIN})
        assert listed.headers["access-control-allow-origin"] == LISTED_ORIGIN
        assert "access-control-allow-credentials" not in listed.headers  # the API takes a Bearer key, not cookies
        for origin in FOREIGN_ORIGINS:
            foreign = client.get("/gradio_api/token", headers={"Origin": origin})
            assert granted(foreign) == {}, origin
