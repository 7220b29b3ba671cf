"""The README's curl and Python examples, run as written against a live server, so the docs cannot rot."""

from __future__ import annotations

import contextlib
import io
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.live_server import LiveServer, serve

README = Path(__file__).resolve().parent.parent / "README.md"
README_URL = "http://127.0.0.1:7860"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.DOTALL)


def blocks(language: str, must_contain: str) -> list[str]:
    return [code for lang, code in BLOCK.findall(README.read_text()) if lang == language and must_contain in code]


CURL_EXAMPLES = blocks("bash", "curl ")
PYTHON_EXAMPLES = blocks("python", README_URL)


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_llama_dir)) as live:
        yield live


def test_readme_has_examples_for_every_route_and_endpoint() -> None:
    text = "\n".join(CURL_EXAMPLES + PYTHON_EXAMPLES)
    for target in (
        "/health",
        "/model-info",
        "/generate",
        "/tokenize",
        "/v1/chat/completions",
        "/v1/completions",
        "OpenAI(",
        "InferenceClient(",
        '"inputs"',
        'api_name="/generate"',
        'api_name="/chat"',
        '"stream": true',
    ):
        assert target in text, target


def as_served(example: str, server: LiveServer) -> str:
    """The README talks to the default model at :7860; the test server runs a tiny model on another port."""
    served_name = Path(server.app.state.settings.model_id).name
    return example.replace(README_URL, server.url).replace("SmolLM2-135M-Instruct", served_name)


@pytest.mark.parametrize("example", CURL_EXAMPLES, ids=lambda code: code.split()[2][:40])
def test_curl_example_runs(server: LiveServer, example: str) -> None:
    completed = subprocess.run(
        ["bash", "-c", as_served(example, server)], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr
    if completed.stdout.startswith("data: "):  # a stream of server-sent events
        events = [json.loads(line[6:]) for line in completed.stdout.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "done", events[-1]
    else:
        body = json.loads(completed.stdout)
        assert "error" not in body, body


@pytest.mark.parametrize("example", PYTHON_EXAMPLES, ids=lambda code: code.split("api_name=")[-1][:20])
def test_python_example_runs(server: LiveServer, example: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # the tests run with HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every URL, this local server's too
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(as_served(example, server), "README.md", "exec"), {})
    assert output.getvalue().strip()


def test_every_setting_is_documented_in_the_settings_table() -> None:
    from inference.settings import Settings

    text = README.read_text()
    for name, field in Settings.model_fields.items():
        alias = field.validation_alias
        env_name = alias.choices[0] if alias is not None and hasattr(alias, "choices") else name.upper()
        assert f"| `{env_name}` |" in text, f"{env_name} is missing from the README's settings table"


def test_the_settings_table_gives_the_real_defaults() -> None:
    from inference.settings import Settings

    text = README.read_text()
    checked = 0
    for name, field in Settings.model_fields.items():
        default = field.default
        if isinstance(default, bool) or not isinstance(default, int | float | str):
            continue  # paths, secrets and lists are described in words
        alias = field.validation_alias
        env_name = alias.choices[0] if alias is not None and hasattr(alias, "choices") else name.upper()
        documented = re.search(rf"^\| `{env_name}` \| `([^`]*)` \|", text, re.MULTILINE)
        assert documented is not None, env_name
        value = documented.group(1)
        assert (float(value) == default) if isinstance(default, int | float) else (value == default), (env_name, value)
        checked += 1
    assert checked >= 20
