"""Text Generation Inference's API, driven through huggingface_hub's InferenceClient (its `text_generation`, as
documented: plain, `details=True`, `stream=True` and both) and checked against the engine and transformers."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from tests.conftest import Submission
from tests.live_server import LiveServer, serve

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_llama_dir, max_new_tokens=32)) as live:
        yield live


@pytest.fixture
def hf(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    from huggingface_hub import InferenceClient, constants

    # the tests run with HF_HUB_OFFLINE=1, which makes huggingface_hub refuse every URL, this local server's too
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    return InferenceClient(base_url=server.url, timeout=60)


def greedy_reference(folder: Path, prompt_ids: list[int], steps: int) -> tuple[list[int], list[float]]:
    """transformers' own greedy tokens and each one's log-probability, from full forward passes."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids, logprobs = list(prompt_ids), []
    with torch.inference_mode():
        for _ in range(steps):
            scores = model(torch.tensor([ids])).logits[0, -1].float().log_softmax(-1)
            token = int(scores.argmax())
            ids.append(token)
            logprobs.append(float(scores[token]))
    return ids[len(prompt_ids) :], logprobs


def test_text_generation_plain_and_streamed_agree(hf: Any) -> None:
    text = hf.text_generation(PROMPT, max_new_tokens=12)
    assert isinstance(text, str)
    assert text
    # no do_sample and no warpers: greedy, as TGI decodes
    assert hf.text_generation(PROMPT, max_new_tokens=12) == text
    pieces = list(hf.text_generation(PROMPT, max_new_tokens=12, stream=True))
    assert all(isinstance(piece, str) for piece in pieces)
    assert "".join(pieces) == text


def test_details_give_tokens_and_logprobs_of_a_full_forward_pass(
    hf: Any, server: LiveServer, tiny_llama_dir: Path
) -> None:
    output = hf.text_generation(PROMPT, max_new_tokens=8, details=True)
    details = output.details
    assert details.generated_tokens == len(details.tokens) > 0
    assert details.finish_reason in ("length", "eos_token")
    assert details.seed is None  # greedy
    prompt_ids = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    ids, logprobs = greedy_reference(tiny_llama_dir, prompt_ids, len(details.tokens))
    assert [token.id for token in details.tokens] == ids
    for token, expected in zip(details.tokens, logprobs, strict=True):
        assert math.isclose(token.logprob, expected, abs_tol=1e-4), (token, expected)


def test_streamed_details_end_with_the_whole_text(hf: Any) -> None:
    events = list(hf.text_generation(PROMPT, max_new_tokens=10, details=True, stream=True, do_sample=True, seed=7))
    assert [event.details is not None for event in events] == [False] * (len(events) - 1) + [True]
    last = events[-1]
    assert last.details.generated_tokens == len(events)
    assert last.details.seed == 7
    assert last.generated_text == "".join(event.token.text for event in events)
    assert all(event.token.logprob <= 0 for event in events)
    # the same seed gives the same text, streamed or not
    again = hf.text_generation(PROMPT, max_new_tokens=10, do_sample=True, seed=7)
    assert again == last.generated_text


def test_tgi_body_on_generate_and_return_full_text(server: LiveServer) -> None:
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 5, "return_full_text": True, "details": True}}
    answer = httpx.post(f"{server.url}/generate", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    data = answer.json()
    assert data["generated_text"].startswith(PROMPT)
    assert data["details"]["generated_tokens"] == len(data["details"]["tokens"])
    compat = httpx.post(f"{server.url}/", json=body, timeout=60).json()
    assert compat == [data]
    # the server's own /generate shape is unchanged
    own = httpx.post(f"{server.url}/generate", json={"prompt": PROMPT, "max_new_tokens": 5, "temperature": 0})
    assert own.json()["generated_text"] == data["generated_text"][len(PROMPT) :]


def test_unsupported_tgi_parameters_are_named_in_one_422(server: LiveServer) -> None:
    parameters = {"best_of": 2, "watermark": True, "top_n_tokens": 3, "max_new_tokens": 4}
    answer = httpx.post(f"{server.url}/generate", json={"inputs": PROMPT, "parameters": parameters})
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["param"] == "best_of,top_n_tokens,watermark"
    unknown = httpx.post(f"{server.url}/generate_stream", json={"inputs": PROMPT, "parameters": {"nope": 1}})
    assert unknown.status_code == 422
    assert unknown.json()["error"]["message"] == "`parameters.nope` is not a known parameter"
    assert unknown.json()["error"]["param"] == "parameters.nope"
    # off values of the same parameters are TGI's defaults, and accepted
    off = {"best_of": 1, "watermark": False, "top_n_tokens": 0, "decoder_input_details": False, "max_new_tokens": 2}
    assert httpx.post(f"{server.url}/", json={"inputs": PROMPT, "parameters": off}, timeout=60).status_code == 200


def test_truncate_keeps_the_prompts_last_tokens(server: LiveServer) -> None:
    long_prompt = "one two three four five six seven eight nine ten " * 3
    tail_ids = httpx.post(f"{server.url}/tokenize", json={"prompt": long_prompt}).json()["tokens"][-6:]
    body = {"inputs": long_prompt, "parameters": {"max_new_tokens": 3, "truncate": 6, "details": True}}
    truncated = httpx.post(f"{server.url}/generate_stream", json=body, timeout=60)
    assert truncated.status_code == 200
    last = [line for line in truncated.text.splitlines() if line.startswith("data:")][-1]
    assert '"input_length":6' in last.replace(" ", "")
    assert len(tail_ids) == 6


def test_info_in_tgis_shape(server: LiveServer) -> None:
    info = httpx.get(f"{server.url}/info").json()
    settings = server.app.state.settings
    assert info["model_id"] == settings.model_id
    assert info["max_input_tokens"] == settings.max_input_tokens
    assert info["max_total_tokens"] == settings.max_input_tokens + settings.max_new_tokens
    assert httpx.get(f"{server.url}/generate_stream").status_code == 405


def test_log_probabilities_are_computed_only_where_the_answer_shows_them(
    hf: Any, submissions: list[Submission]
) -> None:
    hf.text_generation(PROMPT, max_new_tokens=3)
    assert not submissions[-1].params.logprobs
    hf.text_generation(PROMPT, max_new_tokens=3, details=True)
    assert submissions[-1].params.logprobs
    list(hf.text_generation(PROMPT, max_new_tokens=3, stream=True))
    assert submissions[-1].params.logprobs
