"""What the playground's events and the named Gradio endpoints run: thin calls into the engine.

The public `/chat` and the playground's chat share one path into the engine (`_stream_chat`); the playground's version
also gets the engine's `GenerationResult`, for the tokens/s line under the conversation.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import gradio as gr

from inference.client import EngineFrontEnd, GenerationResult, TextChunk, check_lengths
from inference.errors import EngineError, GenerationError, InvalidRequestError
from inference.params import SamplingParams, build_sampling_params
from inference.prompts import ChatMessage, PreparedPrompt
from inference.schemas import ModelInfo
from inference.settings import Settings
from inference.text import check_text
from ui.layout import TOP_K_SLIDER_MAX

logger = logging.getLogger("ui")

History = list[dict[str, Any]]

# The stats line under a reply, while it is on its way and once it is done.
WAITING = "Waiting for the model…"
GENERATING = "Generating… {tokens} tokens"
_GENERATING_COUNT = re.compile(r"^Generating… (\d+) tokens")
FINISH_REASONS = {"length": "reached max_length", "eos": "end of reply", "stop": "stop string"}

# Presets of the sampling sliders: (temperature, top_p, top_k, repetition penalty). "balanced" is the server's defaults.
PRESETS: dict[str, tuple[float, float, int, float]] = {
    "precise": (0.2, 0.8, 20, 1.1),
    "creative": (1.1, 0.98, 100, 1.0),
}


HISTORY_SHAPE = '`history` must be a list of messages like {"role": "user", "content": "Hello"}'
# The public /generate's inputs, in order: what its validator reports on, one verdict each.
GENERATE_INPUTS = ("prompt", "max_length", "temperature", "top_p", "top_k")


def flatten_content(content: Any) -> str:
    """Gradio 6 Chatbot messages carry a list of typed parts (`{"type": "text", "text": ...}`); chat templates want a
    plain string. Anything else is refused (a text model has no use for files), never turned into its repr."""
    parts = content if isinstance(content, list) else [content]
    texts = []
    for part in parts:
        text = part.get("text") if isinstance(part, dict) and part.get("type", "text") == "text" else part
        if not isinstance(text, str):
            raise InvalidRequestError(
                f"{HISTORY_SHAPE}; a message's content is text or a list of text parts", param="history"
            )
        texts.append(check_text(text, "history"))
    return "".join(texts)


def history_turns(history: Any) -> History:
    """The conversation so far, checked: a list of {"role": "user" | "assistant", "content": ...} messages."""
    if history is None:
        return []
    if not isinstance(history, list) or not all(
        isinstance(turn, dict) and turn.get("role") in ("user", "assistant") for turn in history
    ):
        raise InvalidRequestError(f"{HISTORY_SHAPE} (roles `user` and `assistant`)", param="history")
    return history


def to_messages(system_prompt: str | None, history: History | None, message: str | None) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    if system_prompt is not None and check_text(system_prompt, "system_prompt").strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for turn in history_turns(history):
        messages.append({"role": turn["role"], "content": flatten_content(turn.get("content"))})
    if message:
        messages.append({"role": "user", "content": message})
    return messages


def parse_stop(text: str | None) -> list[str] | None:
    """The "stop strings" box: one per line; `\\n` and `\\t` typed as two characters mean a newline and a tab."""
    if text is None:
        return None
    stops = [line.replace("\\n", "\n").replace("\\t", "\t") for line in check_text(text, "stop").splitlines() if line]
    return stops or None


def split_last_turn(history: History | None) -> tuple[History, str]:
    """The conversation before the user's last message, and that message's text (empty if there is none)."""
    turns = list(history_turns(history))
    end = len(turns)
    while end and turns[end - 1].get("role") != "user":
        end -= 1
    start = end
    while start and turns[start - 1].get("role") == "user":
        start -= 1
    text = "\n".join(flatten_content(turn.get("content")) for turn in turns[start:end])
    return turns[:start], text


def format_stats(result: GenerationResult) -> str:
    """One line under a finished reply: "24 tokens · 18.3 tokens/s · 1.3 s · ..."."""
    parts = [
        f"**{result.completion_tokens} tokens**",
        f"{result.tokens_per_second:.1f} tokens/s",
        f"{result.total_seconds:.1f} s",
        f"first token after {result.time_to_first_token_seconds:.2f} s",
        f"prompt {result.prompt_tokens} tokens",
        FINISH_REASONS.get(result.finish_reason, result.finish_reason),
    ]
    return " · ".join(parts)


def format_model_info(info: ModelInfo, snapshot: dict[str, int]) -> str:
    """/model-info as two readable Markdown tables."""
    limits = info.limits
    template = "yes (its own chat template)"
    if not info.has_chat_template:
        template = "no (chat uses a `User:`/`Assistant:` transcript)"
    rows = [
        ("Loaded from", f"{info.source}: `{info.location}`"),
        ("Architecture", info.architecture),
        ("Parameters", f"{info.parameters / 1e6:,.1f} M"),
        ("Weights", f"{info.dtype} on {info.device}"),
        ("Context length", f"{info.context_length:,} tokens"),
        ("Chat model", template),
        ("Server version", info.version),
        ("Now", f"{snapshot['running']} running, {snapshot['waiting']} waiting"),
    ]
    limit_rows = [
        ("Longest prompt", f"{limits.max_input_tokens:,} tokens"),
        ("Most new tokens", f"{limits.max_new_tokens:,}"),
        ("Batch", f"{limits.max_batch_size} sequences, {limits.max_batch_tokens:,} tokens"),
        ("Queue", f"{limits.max_queue_size} waiting requests"),
        ("Stop strings", f"{limits.max_stop_sequences}, up to {limits.max_stop_length} characters each"),
        ("Request timeout", f"{limits.request_timeout_s:g} s"),
    ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    limit_table = "\n".join(f"| {name} | {value} |" for name, value in limit_rows)
    return f"| Model | `{info.model_id}` |\n| :-- | :-- |\n{table}\n\n| Limit | Value |\n| :-- | :-- |\n{limit_table}"


class Handlers:
    """Bound to one engine; every method here is what an event listener or `gr.api` calls."""

    def __init__(self, engine: EngineFrontEnd, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        # How many requests each call of the batched /generate received (proof that Gradio's queue batches).
        self.generate_batch_sizes: collections.Counter[int] = collections.Counter()
        # The parameters of the latest request from any entry point here (the browser tests check the sliders).
        self.last_params: SamplingParams | None = None

    def sampling_params(
        self,
        max_length: float | None,
        temperature: float | None,
        top_p: float | None,
        top_k: float | None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: str | list[str] | None = None,
    ) -> SamplingParams:
        # No int() here: build_sampling_params says "must be an integer" to "12.5", "abc" or NaN, in words.
        params = build_sampling_params(
            self.settings,
            max_new_tokens=max_length,  # type: ignore[arg-type]
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,  # type: ignore[arg-type]
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop=stop,
        )
        self.last_params = params
        return params

    async def _prepare_completion(self, prompt: str) -> PreparedPrompt:
        if check_text(prompt, "prompt") == "":
            raise InvalidRequestError("The prompt is empty: type something to continue.", param="prompt")
        return await self.engine.tokenize_completion(prompt)

    # ----- the named endpoints ------------------------------------------------------------------------------------

    async def validate_generate(
        self, prompt: str, max_length: int, temperature: float, top_p: float, top_k: int
    ) -> list[dict[str, Any]]:
        """/generate's validator: Gradio runs it on each call as it joins the queue, before calls are batched, so a
        call that can't be served is refused alone (422; gradio_client raises ValidationError with this message)
        and never reaches, or fails, a batch of others. One verdict per input, in GENERATE_INPUTS order."""
        try:
            prepared = await self._prepare_completion(prompt)
            params = self.sampling_params(max_length, temperature, top_p, top_k)
            check_lengths(self.settings, self.engine.context_length, len(prepared.token_ids), params)
        except EngineError as error:
            failed = error.param if error.param in GENERATE_INPUTS else "prompt"
            message = error.message
            if error.param == "max_new_tokens":  # speak the caller's language: this endpoint calls it max_length
                failed, message = "max_length", message.replace("`max_new_tokens`", "`max_length`")
            return [gr.validate(name != failed, message if name == failed else "") for name in GENERATE_INPUTS]
        return [gr.validate(True, "") for _ in GENERATE_INPUTS]

    async def _complete_one(
        self, prompt: str, max_length: int, temperature: float, top_p: float, top_k: int
    ) -> GenerationResult | EngineError:
        try:
            params = self.sampling_params(max_length, temperature, top_p, top_k)
            return await self.engine.generate(await self._prepare_completion(prompt), params, route="gradio:/generate")
        except EngineError as error:
            return error
        except Exception:  # a bug must fail this call alone, not the batch
            logger.exception("gradio:/generate failed")
            return GenerationError("Generation failed inside the server.")

    async def generate(
        self,
        prompt: list[str],
        max_length: list[int],
        temperature: list[float],
        top_p: list[float],
        top_k: list[int],
    ) -> list[list[str]]:
        """Batched: Gradio hands over every waiting request at once; they all join the engine's running batch."""
        self.generate_batch_sizes[len(prompt)] += 1
        outcomes = await asyncio.gather(
            *(
                self._complete_one(*request)
                for request in zip(prompt, max_length, temperature, top_p, top_k, strict=True)
            )
        )
        errors = [outcome for outcome in outcomes if isinstance(outcome, EngineError)]
        if len(errors) == len(outcomes):
            # Alone (or every call failed): fail the call so clients get an exception with the reason.
            raise gr.Error(errors[0].message, print_exception=False)
        # Bad input never gets here (the validator refused it), but the server can still fail one call of a batch
        # (queue full, timeout, a fault): Gradio gives a batch one outcome, so that call's text says why (README).
        return [
            [f"Error: {outcome.message}" if isinstance(outcome, EngineError) else outcome.text for outcome in outcomes]
        ]

    async def _stream_chat(
        self, message: str, history: History | None, system_prompt: str, params: SamplingParams, route: str
    ) -> AsyncIterator[TextChunk | GenerationResult]:
        """The one way into the engine for a chat turn. Closing this stream (a cancelled Gradio event, a client that
        left) cancels the request inside the engine."""
        if not check_text(message, "message").strip():
            raise InvalidRequestError("The message is empty.", param="message")
        prepared = await self.engine.tokenize_chat(to_messages(system_prompt, history, message))
        async for event in self.engine.stream(prepared, params, route=route):
            yield event

    async def chat(
        self,
        message: str,
        history: list[dict[str, Any]] | None = None,
        system_prompt: str = "",
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        max_length: int | None = None,
        repetition_penalty: float | None = None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> AsyncIterator[str]:
        """Stream the assistant's reply to `message` after `history`; each value is the reply so far."""
        reply = ""
        try:
            params = self.sampling_params(max_length, temperature, top_p, top_k, repetition_penalty, seed, stop)
            async for event in self._stream_chat(message, history, system_prompt, params, "gradio:/chat"):
                if isinstance(event, TextChunk):
                    reply += event.text
                    yield reply
        except EngineError as error:
            raise gr.Error(error.message, print_exception=False) from error
        if not reply:
            yield reply

    # ----- the playground's chat ----------------------------------------------------------------------------------

    async def respond(
        self,
        history: History,
        system_prompt: str,
        temperature: float,
        top_p: float,
        top_k: float,
        max_length: float,
        repetition_penalty: float,
        seed: int | None,
        stop: str,
    ) -> AsyncIterator[tuple[Any, str, Any]]:
        """Stream the reply to the last user turn into the conversation, with a live token count, then the stats.
        Outputs: the conversation, the stats line, the message box (only touched when the request fails)."""
        earlier: History = []
        updated: History = []
        message = reply = ""
        try:
            earlier, message = split_last_turn(history)
            updated = [*history, {"role": "assistant", "content": ""}]
            params = self.sampling_params(
                max_length, temperature, top_p, top_k, repetition_penalty, seed, parse_stop(stop)
            )
            async for event in self._stream_chat(message, earlier, system_prompt, params, "gradio:playground"):
                if isinstance(event, TextChunk):
                    reply += event.text
                    updated[-1] = {"role": "assistant", "content": reply}
                    yield updated, GENERATING.format(tokens=event.completion_tokens), gr.skip()
                else:
                    updated[-1] = {"role": "assistant", "content": reply}
                    yield updated, format_stats(event), gr.skip()
        except EngineError as error:
            # A toast rather than gr.Error: an error would cover the whole conversation with Gradio's error overlay.
            gr.Warning(error.message)
            if reply:  # failed midway (a timeout): keep what came, say why it ended
                yield updated, f"Stopped: {error.message}", gr.skip()
            else:  # refused (too long, queue full): take the message back into the box, to shorten or resend
                yield earlier, f"Not sent: {error.message}", message

    @staticmethod
    def add_user_message(message: str, history: History | None) -> tuple[Any, History, str]:
        try:
            if not check_text(message, "message").strip():
                raise gr.Error("Type a message first.", print_exception=False)
            turns = history_turns(history)
        except EngineError as error:
            raise gr.Error(error.message, print_exception=False) from error
        return gr.update(value="", interactive=False), [*turns, {"role": "user", "content": message}], WAITING

    @staticmethod
    def use_example(example: gr.SelectData, history: History | None) -> tuple[Any, History, str]:
        text = example.value.get("text", "") if isinstance(example.value, dict) else str(example.value)
        return Handlers.add_user_message(text, history)

    @staticmethod
    def regenerate(history: History | None) -> tuple[Any, History, str]:
        """Drop the last reply (the user's message stays) so that `respond` writes a new one."""
        try:
            earlier, message = split_last_turn(history)
        except EngineError as error:
            raise gr.Error(error.message, print_exception=False) from error
        if not message:
            raise gr.Error("There is no message to answer again yet.", print_exception=False)
        return gr.update(interactive=False), [*earlier, {"role": "user", "content": message}], WAITING

    @staticmethod
    def edit(edited: gr.EditData, history: History) -> tuple[Any, History, str]:
        """The user changed one of their messages: the conversation restarts from it."""
        index = edited.index[0] if isinstance(edited.index, (list, tuple)) else edited.index
        try:
            text = flatten_content(edited.value)
            turns = history_turns(history)
        except EngineError as error:
            raise gr.Error(error.message, print_exception=False) from error
        return Handlers.add_user_message(text, turns[: index if isinstance(index, int) else len(turns)])

    @staticmethod
    def undo(history: History | None) -> tuple[History, str, str]:
        """Take back the last message and its reply; the message returns to the box, to edit and send again."""
        try:
            earlier, message = split_last_turn(history)
        except EngineError as error:
            raise gr.Error(error.message, print_exception=False) from error
        if not message:
            return list(history or []), gr.skip(), ""
        return earlier, message, ""

    @staticmethod
    def clear() -> tuple[History, str, str]:
        return [], "", ""

    @staticmethod
    def reply_ended(stats: str) -> tuple[Any, str]:
        """After a reply, however it ended: the message box takes input again; a stopped reply says so."""
        counted = _GENERATING_COUNT.match(stats or "")
        if counted:
            stats = f"Stopped after {counted.group(1)} tokens."
        elif stats == WAITING:
            stats = "Stopped before the first token."
        return gr.update(interactive=True), stats

    # ----- completion ---------------------------------------------------------------------------------------------

    async def complete(
        self,
        prompt: str,
        temperature: float,
        top_p: float,
        top_k: float,
        max_length: float,
        repetition_penalty: float,
        seed: int | None,
        stop: str,
    ) -> AsyncIterator[tuple[str, str]]:
        """The playground's completion box: the prompt and its continuation stream in, then the stats."""
        text = ""
        try:
            params = self.sampling_params(
                max_length, temperature, top_p, top_k, repetition_penalty, seed, parse_stop(stop)
            )
            prepared = await self._prepare_completion(prompt)
            yield "", WAITING
            async for event in self.engine.stream(prepared, params, route="gradio:playground"):
                if isinstance(event, TextChunk):
                    text += event.text
                    yield text, GENERATING.format(tokens=event.completion_tokens)
                else:
                    yield text, format_stats(event)
        except EngineError as error:
            gr.Warning(error.message)
            yield text, f"{'Stopped' if text else 'Not sent'}: {error.message}"

    @staticmethod
    def completion_ended(stats: str) -> str:
        return Handlers.reply_ended(stats)[1]

    # ----- parameters and the model panel -------------------------------------------------------------------------

    def preset(self, name: str | None) -> tuple[Any, Any, Any, Any]:
        """The sliders a preset sets: temperature, top_p, top_k, repetition penalty."""
        if name == "balanced":
            settings = self.settings
            top_k = min(settings.default_top_k, TOP_K_SLIDER_MAX)
            return settings.default_temperature, settings.default_top_p, top_k, 1.0
        if name in PRESETS:
            return PRESETS[name]
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()

    @staticmethod
    def leave_preset() -> None:
        """A slider moved by hand: no preset is selected any more."""
        return None

    def model_info(self) -> tuple[str, dict[str, Any]]:
        """/model-info as tables, and as the raw JSON."""
        try:
            info = self.engine.info()
        except EngineError as error:
            return f"**The model is not ready.** {error.message}", {"status": error.message}
        return format_model_info(info, self.engine.snapshot()), info.model_dump()
