"""The playground in a real browser: Playwright drives Debian's Chromium against a live server.

Most tests use the tiny Llama (its replies are random text, but they stream, stop and regenerate like real ones); one
test, also marked `real_model`, chats with the default model and takes the README's screenshot. Screenshots go to
test-artifacts/ (gitignored); with UPDATE_SCREENSHOTS=1 the real-model test also rewrites docs/playground.png.

Needs `playwright` (requirements-dev.txt) and Chromium at /usr/bin/chromium (`apt-get install -y chromium`, which
`make test` does when run as root), or set CHROMIUM to another Chromium binary.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.engine import Engine
from inference.settings import Settings
from tests.conftest import Submission
from tests.live_server import LiveServer, serve

playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install -r requirements-dev.txt")
Browser = playwright_sync.Browser
Page = playwright_sync.Page
expect = playwright_sync.expect

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
README_SCREENSHOT = ROOT / "docs" / "playground.png"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
# Random replies of the tiny model take many tokens once tokenized again: room for a short conversation.
MAX_INPUT_TOKENS = 160
MAX_NEW_TOKENS = 300
STATS = re.compile(r"(\d+) tokens · [\d.]+ tokens/s · [\d.]+ s")
# Records every text the last reply shows: several texts mean it streamed rather than arrived whole.
WATCH_REPLIES = """() => {
  window.seenReplies = [];
  const chatbot = document.querySelector('#chatbot');
  new MutationObserver(() => {
    const replies = chatbot.querySelectorAll('[data-testid="bot"]');
    if (replies.length) window.seenReplies.push(replies[replies.length - 1].innerText);
  }).observe(chatbot, {subtree: true, childList: true, characterData: true});
}"""


# ----- fixtures -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {CHROMIUM}: `apt-get install -y chromium`, or set CHROMIUM to a binary")
    with playwright_sync.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    settings = make_settings(tiny_llama_dir, max_input_tokens=MAX_INPUT_TOKENS, max_new_tokens=MAX_NEW_TOKENS)
    with serve(settings) as live:
        yield live


def open_playground(browser: Browser, url: str, **context: Any) -> Page:
    page = browser.new_context(**{"viewport": DESKTOP, **context}).new_page()
    page.set_default_timeout(20_000)
    page.goto(url + "/")
    page.locator("#chatbot").wait_for()
    page.evaluate(WATCH_REPLIES)
    return page


@pytest.fixture
def page(browser: Browser, server: LiveServer) -> Iterator[Page]:
    page = open_playground(browser, server.url)
    yield page
    page.context.close()


@pytest.fixture
def engine(server: LiveServer) -> Engine:
    return server.app.state.engine


@pytest.fixture
def endless_model(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """`endless_model(delay_s)`: see `make_endless`, for the shared server's engine."""
    return lambda delay_s: make_endless(engine, monkeypatch, delay_s)


def make_endless(engine: Engine, monkeypatch: pytest.MonkeyPatch, delay_s: float) -> None:
    """The engine's model never ends a reply itself (end-of-sequence never wins) and takes `delay_s` longer per step,
    so a long reply is surely still coming when the test acts on it."""
    assert engine.loaded is not None
    decoder, tokenizer = engine.loaded.decoder, engine.loaded.tokenizer
    eos = sorted({tokenizer.eos_token_id, *_as_list(engine.loaded.generation_config.eos_token_id)} - {None})

    def never_eos(logits: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # the decoder's logits are inference tensors
            logits[..., eos] = float("-inf")
        return logits

    original_prefill, original_decode = decoder.prefill, decoder.decode

    def prefill(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay_s)
        cache, logits = original_prefill(*args, **kwargs)
        return cache, never_eos(logits)

    def decode(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay_s)
        return never_eos(original_decode(*args, **kwargs))

    monkeypatch.setattr(decoder, "prefill", prefill)
    monkeypatch.setattr(decoder, "decode", decode)


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# ----- helpers --------------------------------------------------------------------------------------------------------


def send(page: Page, text: str) -> None:
    page.locator("#message textarea").fill(text)
    page.locator("#send").click()


def wait_for_stats(page: Page, element: str = "#chat_stats") -> int:
    """Wait for the line under a finished reply; returns its token count."""
    expect(page.locator(element)).to_contain_text("tokens/s")
    match = STATS.search(page.locator(element).inner_text())
    assert match, page.locator(element).inner_text()
    return int(match.group(1))


def conversation(page: Page) -> list[tuple[str, str]]:
    turns = page.locator('#chatbot [data-testid="user"], #chatbot [data-testid="bot"]')
    return [(turn.get_attribute("data-testid") or "", turn.inner_text()) for turn in turns.all()]


def move_slider(page: Page, elem_id: str, start: str, steps: int) -> None:
    """Drag by keyboard, as a user can: Home or End, then arrow presses (one step each)."""
    slider = page.locator(f"#{elem_id} input[type=range]")
    expect(slider).to_be_visible()
    bound = float(slider.get_attribute("min" if start == "Home" else "max") or "nan")
    target = bound + steps * float(slider.get_attribute("step") or 1)

    def moved() -> bool:
        # a slider in an accordion that is still opening can miss keys (CI once saw End ignored): move it again
        slider.focus()
        slider.press(start)
        for _ in range(abs(steps)):
            slider.press("ArrowRight" if steps > 0 else "ArrowLeft")
        return abs(float(slider.input_value()) - target) < 1e-6

    assert wait_until(moved), f"#{elem_id} did not reach {target}"


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def streamed_texts(page: Page) -> list[str]:
    return [text for text in dict.fromkeys(page.evaluate("window.seenReplies")) if text.strip()]


# ----- chat -----------------------------------------------------------------------------------------------------------


def test_a_message_gets_a_streamed_reply(page: Page, server: LiveServer, engine: Engine, endless_model: Any) -> None:
    endless_model(0.01)
    external: list[str] = []
    page.on("request", lambda request: external.append(request.url) if not _local(request.url, server) else None)
    finished = engine.stats.requests_finished
    move_slider(page, "max_length", "Home", 39)  # 40 tokens
    send(page, "Hello there")
    expect(page.locator("#chat_stats")).to_contain_text("Generating")  # the live count while it streams
    assert wait_for_stats(page) == 40
    assert [role for role, _ in conversation(page)] == ["user", "bot"]
    assert conversation(page)[0][1] == "Hello there"
    assert len(streamed_texts(page)) >= 3, "the reply arrived whole instead of streaming"
    assert engine.stats.requests_finished == finished + 1
    assert external == [], "the page loaded something from outside the server"


def _local(url: str, server: LiveServer) -> bool:
    return url.startswith((server.url, "data:", "blob:"))


def test_every_parameter_reaches_the_server(page: Page, submissions: list[Submission]) -> None:
    move_slider(page, "temperature", "Home", 3)  # 0.15
    move_slider(page, "top_p", "End", -2)  # 0.98
    move_slider(page, "top_k", "Home", 7)
    move_slider(page, "max_length", "Home", 11)  # 12
    page.locator("#advanced").click()
    move_slider(page, "repetition_penalty", "End", -2)  # 1.9
    page.locator("#seed input").fill("1234")
    page.locator("#stop_strings textarea").fill("\\n\nzzz")
    expect(page.locator("#preset input:checked")).to_have_count(0)  # moved by hand: no preset applies any more
    send(page, "Hi")
    assert wait_for_stats(page) <= 12
    params = submissions[-1].params
    assert params.temperature == pytest.approx(0.15)
    assert params.top_p == pytest.approx(0.98)
    assert params.top_k == 7
    assert params.max_new_tokens == 12
    assert params.repetition_penalty == pytest.approx(1.9)
    assert params.seed == 1234
    assert params.stop == ("\n", "zzz")


def test_a_json_schema_makes_the_reply_json(page: Page, submissions: list[Submission]) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    page.locator("#advanced").click()
    page.locator("#json_schema textarea").fill(json.dumps(schema))
    send(page, "Answer in JSON")
    wait_for_stats(page)
    assert submissions[-1].params.grammar is not None
    reply = json.loads(conversation(page)[-1][1])
    assert set(reply) == {"ok", "n"}
    assert isinstance(reply["ok"], bool)
    assert 0 <= reply["n"] <= 9
    # a schema that can't be used says why, and the message stays to send again
    page.locator("#json_schema textarea").fill('{"type": "nonsense"}')
    send(page, "Again")
    expect(page.locator("#chat_stats")).to_contain_text("JSON schema")
    expect(page.locator("#message textarea")).to_have_value("Again")


def test_a_preset_sets_the_sliders(page: Page, submissions: list[Submission], server: LiveServer) -> None:
    page.locator("#preset").get_by_text("precise").click()
    expect(page.locator("#temperature input[type=number]")).to_have_value("0.2")
    expect(page.locator("#top_k input[type=number]")).to_have_value("20")
    send(page, "Hi")
    wait_for_stats(page)
    params = submissions[-1].params
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty) == pytest.approx(
        (0.2, 0.8, 20, 1.1)
    )
    assert params.seed is None  # the empty seed box means a random seed, not 0
    page.locator("#preset").get_by_text("balanced").click()
    settings: Settings = server.app.state.settings
    expect(page.locator("#temperature input[type=number]")).to_have_value(f"{settings.default_temperature:g}")


def test_stop_ends_the_generation_in_the_engine(page: Page, engine: Engine, endless_model: Any) -> None:
    endless_model(0.02)  # MAX_NEW_TOKENS would take over 6 s
    cancelled = engine.stats.requests_cancelled
    move_slider(page, "max_length", "End", 0)
    send(page, "Tell me a long story.")
    expect(page.locator("#chat_stats")).to_contain_text("Generating")
    assert engine.snapshot()["running"] == 1
    page.locator("#stop").click()
    assert wait_until(lambda: engine.snapshot()["running"] == 0, 5), "the engine kept generating after Stop"
    assert engine.stats.requests_cancelled == cancelled + 1
    expect(page.locator("#chat_stats")).to_contain_text("Stopped after")
    tokens = int(re.findall(r"\d+", page.locator("#chat_stats").inner_text())[0])
    assert 0 < tokens < MAX_NEW_TOKENS
    reply = conversation(page)[-1]
    time.sleep(0.3)
    assert conversation(page)[-1] == reply, "the reply kept growing after Stop"
    assert reply[0] == "bot"
    expect(page.locator("#message textarea")).to_be_editable()


def test_regenerate_replaces_the_last_reply(page: Page, engine: Engine, endless_model: Any) -> None:
    endless_model(0.0)
    move_slider(page, "max_length", "Home", 29)  # 30 tokens
    send(page, "Say something.")
    wait_for_stats(page)
    first = conversation(page)
    finished = engine.stats.requests_finished
    page.locator("#regenerate").click()
    assert wait_until(lambda: engine.stats.requests_finished == finished + 1)
    expect(page.locator("#chat_stats")).to_contain_text("tokens/s")
    second = conversation(page)
    assert [role for role, _ in second] == ["user", "bot"]
    assert second[0] == first[0] == ("user", "Say something.")
    assert second[1] != first[1]
    # The chatbot's own retry button under the reply does the same.
    page.locator('#chatbot button[aria-label="Retry"]').click()
    assert wait_until(lambda: engine.stats.requests_finished == finished + 2)
    expect(page.locator("#chat_stats")).to_contain_text("tokens/s")
    third = conversation(page)
    assert [role for role, _ in third] == ["user", "bot"]
    assert third[1] != second[1]


def test_editing_a_message_restarts_the_conversation_from_it(page: Page, engine: Engine, endless_model: Any) -> None:
    endless_model(0.0)
    move_slider(page, "max_length", "Home", 9)
    send(page, "Original question")
    wait_for_stats(page)
    send(page, "Follow-up")
    expect(page.locator('#chatbot [data-testid="bot"]')).to_have_count(2)
    wait_for_stats(page)
    finished = engine.stats.requests_finished
    page.locator('#chatbot button[aria-label="Edit"]').first.click()
    page.locator("#chatbot textarea").fill("Edited question")
    page.locator('#chatbot button[aria-label="Submit"]').click()
    assert wait_until(lambda: engine.stats.requests_finished == finished + 1)
    expect(page.locator("#chat_stats")).to_contain_text("tokens/s")
    turns = conversation(page)
    assert [role for role, _ in turns] == ["user", "bot"]
    assert turns[0][1] == "Edited question"


def test_undo_takes_the_message_back_and_clear_empties_the_chat(page: Page, endless_model: Any) -> None:
    endless_model(0.0)
    move_slider(page, "max_length", "Home", 9)
    send(page, "First message")
    wait_for_stats(page)
    send(page, "Second message")
    expect(page.locator('#chatbot [data-testid="bot"]')).to_have_count(2)
    wait_for_stats(page)
    page.locator("#undo").click()
    expect(page.locator('#chatbot [data-testid="bot"]')).to_have_count(1)
    expect(page.locator("#message textarea")).to_have_value("Second message")
    assert [text for role, text in conversation(page) if role == "user"] == ["First message"]
    page.locator("#clear").click()
    expect(page.locator('#chatbot [data-testid="user"], #chatbot [data-testid="bot"]')).to_have_count(0)
    expect(page.locator("#chat_stats")).to_have_text("")


def test_an_over_long_prompt_shows_a_readable_error(page: Page, engine: Engine) -> None:
    move_slider(page, "max_length", "Home", 4)
    send(page, "Hi")
    wait_for_stats(page)
    finished = engine.stats.requests_finished
    text = "word " * (2 * MAX_INPUT_TOKENS)
    send(page, text)
    toast = page.locator(".toast-body").first
    expect(toast).to_contain_text("tokens")
    expect(toast).to_contain_text(f"limit of {MAX_INPUT_TOKENS} tokens")
    assert "Traceback" not in toast.inner_text()
    expect(toast).to_be_in_viewport()
    ARTIFACTS.mkdir(exist_ok=True)
    page.wait_for_timeout(500)  # the toast slides in
    page.screenshot(path=ARTIFACTS / "playground-error.png")
    # The refused message is taken back into the box, to shorten; the conversation before it stays.
    expect(page.locator("#message textarea")).to_have_value(text)
    expect(page.locator("#message textarea")).to_be_editable()
    assert [role for role, _ in conversation(page)] == ["user", "bot"]
    expect(page.locator("#chat_stats")).to_contain_text("Not sent: The prompt has")
    assert engine.stats.requests_finished == finished


def test_a_waiting_request_shows_its_place_in_the_queue(
    browser: Browser, tiny_llama_dir: Path, make_settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One reply at a time: while the first streams, the second waits in Gradio's queue.
    with serve(make_settings(tiny_llama_dir, max_batch_size=1)) as live:
        make_endless(live.app.state.engine, monkeypatch, 0.02)
        first, second = open_playground(browser, live.url), open_playground(browser, live.url)
        try:
            send(first, "First in line")
            expect(first.locator("#chat_stats")).to_contain_text("Generating")
            send(second, "Second in line")
            progress = second.locator('#chatbot [data-testid="status-tracker"]').first
            expect(progress).to_contain_text("queue: 1/1")
            expect(progress).to_have_css("opacity", "1")  # shown, not just in the page
            expect(second.locator("#chat_stats")).to_have_text("Waiting for the model…")
            first.locator("#stop").click()
            expect(second.locator("#chat_stats")).to_contain_text("Generating")
            second.locator("#stop").click()
        finally:
            first.context.close()
            second.context.close()


# ----- completion and model panel -------------------------------------------------------------------------------------


def test_completion_streams_with_stats(page: Page, submissions: list[Submission]) -> None:
    page.get_by_role("tab", name="Completion").click()
    move_slider(page, "max_length", "Home", 19)
    page.locator("#prompt textarea").fill("Once upon a time")
    page.locator("#generate").click()
    assert 0 < wait_for_stats(page, "#completion_stats") <= 20
    assert page.locator("#completion textarea").input_value()
    assert [s.params.max_new_tokens for s in submissions] == [20]


def test_model_panel_shows_model_info_as_a_table(page: Page) -> None:
    page.get_by_role("tab", name="Model").click()
    panel = page.locator("#model_info")
    expect(panel.locator("table").first).to_contain_text("LlamaForCausalLM")
    expect(panel).to_contain_text(f"{MAX_INPUT_TOKENS} tokens")
    expect(panel).to_contain_text("512 tokens")  # the tiny model's context length


def test_layout_fits_a_phone_and_dark_mode(browser: Browser, server: LiveServer) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    phone = open_playground(browser, server.url, viewport=PHONE, device_scale_factor=2, is_mobile=True)
    try:
        send(phone, "Hello from a phone")
        wait_for_stats(phone)
        phone.screenshot(path=ARTIFACTS / "playground-phone.png", full_page=True)
        assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"], "sideways scrolling"
        for button in ("#send", "#stop", "#regenerate", "#undo", "#clear"):
            box = phone.locator(button).bounding_box()
            assert box is not None
            assert box["x"] >= 0
            assert box["x"] + box["width"] <= PHONE["width"], button
    finally:
        phone.context.close()
    dark = open_playground(browser, server.url, color_scheme="dark")
    try:
        send(dark, "Hello in the dark")
        wait_for_stats(dark)
        dark.screenshot(path=ARTIFACTS / "playground-dark.png", full_page=True)
        background = dark.evaluate("getComputedStyle(document.querySelector('.gradio-container')).backgroundColor")
        assert _luminance(background) < 0.2, background
        text = dark.evaluate("getComputedStyle(document.querySelector('#chat_stats')).color")
        assert _luminance(text) > 0.4, text
    finally:
        dark.context.close()


def test_the_playground_works_on_its_own_public_origin(browser: Browser, server: LiveServer) -> None:
    """As on a Space or behind a domain: a Host that is not localhost, where CORS is closed to other origins."""
    public_host = "llm.example.org"
    url = server.url.replace("127.0.0.1", public_host)
    resolve = f"--host-resolver-rules=MAP {public_host} 127.0.0.1"
    public = browser.browser_type.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, resolve])
    try:
        page = open_playground(public, url)
        assert page.evaluate("location.host").startswith(public_host)
        send(page, "Hello from a public origin")
        assert wait_for_stats(page) > 0
        assert [role for role, _ in conversation(page)] == ["user", "bot"]
    finally:
        public.close()


def _luminance(css_color: str) -> float:
    red, green, blue = (int(value) for value in re.findall(r"\d+", css_color)[:3])
    return (0.2126 * red + 0.7152 * green + 0.0722 * blue) / 255


# ----- the real model -------------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_answers_an_example_in_the_browser(browser: Browser) -> None:
    with serve(Settings(), ready_timeout_s=300) as live:
        page = open_playground(browser, live.url)
        try:
            page.locator("#system_prompt textarea").fill("You are a helpful assistant.")
            move_slider(page, "temperature", "Home", 0)  # greedy: the same answers every run
            move_slider(page, "max_length", "Home", 63)
            page.locator("#chatbot").get_by_text("What is the capital of France?").click()
            expect(page.locator("#chat_stats")).to_contain_text("tokens/s", timeout=60_000)
            turns = conversation(page)
            assert turns[0] == ("user", "What is the capital of France?")
            assert turns[1][0] == "bot"
            assert "Paris" in turns[1][1]
            assert len(streamed_texts(page)) >= 2, "the reply arrived whole instead of streaming"
            # A second turn, with the first as history, for the README's screenshot.
            send(page, "Write a haiku about the sea.")
            expect(page.locator('#chatbot [data-testid="bot"]')).to_have_count(2)
            expect(page.locator("#chat_stats")).to_contain_text("tokens/s", timeout=60_000)
            assert conversation(page)[3][1].strip()
            page.mouse.move(0, 0)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=ARTIFACTS / "playground.png", full_page=True)
            if os.environ.get("UPDATE_SCREENSHOTS") == "1":
                page.screenshot(path=README_SCREENSHOT, full_page=True)
        finally:
            page.context.close()
