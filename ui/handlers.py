"""What the playground's events and the named Gradio endpoints run: thin calls into the engine.

The public `/chat` and the playground's chat share one path into the engine (`_stream_chat`); the playground's version
also gets the engine's `GenerationResult`, for the tokens/s line under the conversation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

import gradio as gr
from gradio.components import Component

from inference.client import EngineClient, GenerationResult, TextChunk, check_lengths
from inference.errors import EngineError, GenerationError, InvalidRequestError
from inference.grammar import json_schema_grammar, schema_of
from inference.params import SamplingParams, build_sampling_params
from inference.prompts import PreparedPrompt
from inference.schemas import ModelInfo
from inference.settings import Settings
from inference.text import check_text
from ui import history as conversation
from ui.history import History, parse_stop, split_last_turn, to_messages
from ui.layout import TOP_K_SLIDER_MAX, Playground

logger = logging.getLogger("ui")

# The stats line under a reply, while it is on its way and once it is done.
WAITING = "Waiting for the model…"
GENERATING = "Generating… {tokens} tokens"
FINISH_REASONS = {"length": "reached max_length", "eos": "end of reply", "stop": "stop string"}

# The playground and the public Gradio endpoints call max_new_tokens `max_length`; refusals say so.
UI_NAMES = {"max_new_tokens": "max_length"}

# Presets of the sampling sliders, by knob name. "balanced" is the server's defaults.
PRESET_KNOBS = ("temperature", "top_p", "top_k", "repetition_penalty")
PRESETS: dict[str, dict[str, float]] = {
    "precise": {"temperature": 0.2, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1},
    "creative": {"temperature": 1.1, "top_p": 0.98, "top_k": 100, "repetition_penalty": 1.0},
}


# The public /generate's inputs, in order: what its validator reports on, one verdict each.
GENERATE_INPUTS = ("prompt", "max_length", "temperature", "top_p", "top_k")


@dataclass(frozen=True)
class ReplyProgress:
    """How far the reply on its way has got, kept in a `gr.State` beside the stats line: what that line should say
    if the reply stops now. `tokens` is None until the first token arrives; `running` is False once it ended."""

    tokens: int | None = None
    running: bool = True


ENDED = ReplyProgress(running=False)


def stopped_stats(progress: ReplyProgress | None) -> str | None:
    """The stats line for a reply that ended while `progress` said it was running; None: keep the line as it is."""
    if progress is None or not progress.running:
        return None
    if progress.tokens is None:
        return "Stopped before the first token."
    return f"Stopped after {progress.tokens} tokens."


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

    def __init__(self, engine: EngineClient, settings: Settings, ui: Playground) -> None:
        self.engine = engine
        self.settings = settings
        # the playground's components: its events send their inputs as a dict keyed by component
        self.ui = ui

    def sampling_params(self, **knobs: Any) -> SamplingParams:
        """The knobs, by knob name, as sent (no int(): "12.5", "abc" or NaN are refused in words, not by a crash)."""
        return build_sampling_params(self.settings, names=UI_NAMES, **knobs)

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
            params = self.sampling_params(max_new_tokens=max_length, temperature=temperature, top_p=top_p, top_k=top_k)
            length_name = UI_NAMES["max_new_tokens"]
            check_lengths(self.settings, self.engine.context_length, len(prepared.token_ids), params, length_name)
        except EngineError as error:
            failed = error.param if error.param in GENERATE_INPUTS else "prompt"
            return [gr.validate(name != failed, error.message if name == failed else "") for name in GENERATE_INPUTS]
        return [gr.validate(True, "") for _ in GENERATE_INPUTS]

    async def _complete_one(
        self, prompt: str, max_length: int, temperature: float, top_p: float, top_k: int
    ) -> GenerationResult | EngineError:
        try:
            params = self.sampling_params(max_new_tokens=max_length, temperature=temperature, top_p=top_p, top_k=top_k)
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
            params = self.sampling_params(
                max_new_tokens=max_length,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                repetition_penalty=repetition_penalty,
                seed=seed,
                stop=stop,
            )
            async for event in self._stream_chat(message, history, system_prompt, params, "gradio:/chat"):
                if isinstance(event, TextChunk):
                    reply += event.text
                    yield reply
        except EngineError as error:
            raise gr.Error(error.message, print_exception=False) from error
        if not reply:
            yield reply

    # ----- the playground's chat ----------------------------------------------------------------------------------

    def _playground_params(self, inputs: dict[Component, Any]) -> SamplingParams:
        """The sampling sliders' values, by knob name; the stop-strings box holds one string a line; a JSON schema,
        if one is typed, constrains the reply."""
        knobs = self.ui.knob_values(inputs)
        params = self.sampling_params(**{**knobs, "stop": parse_stop(knobs["stop"])})
        schema = str(inputs.get(self.ui.json_schema) or "").strip()
        if not schema:
            return params
        grammar = json_schema_grammar(schema_of(schema, "JSON schema"), "JSON schema")
        return replace(params, grammar=grammar)

    async def respond(self, inputs: dict[Component, Any]) -> AsyncIterator[tuple[Any, str, Any, ReplyProgress]]:
        """Stream the reply to the last user turn into the conversation, with a live token count, then the stats.
        Outputs: the conversation, the stats line, the message box (only touched when the request fails), and the
        reply's progress (for `reply_ended`, should the reply be stopped)."""
        history, system_prompt = inputs[self.ui.chatbot], inputs[self.ui.system_prompt]
        earlier: History = []
        updated: History = []
        message = reply = ""
        try:
            earlier, message = split_last_turn(history)
            updated = [*history, {"role": "assistant", "content": ""}]
            params = self._playground_params(inputs)
            async for event in self._stream_chat(message, earlier, system_prompt, params, "gradio:playground"):
                if isinstance(event, TextChunk):
                    reply += event.text
                    updated[-1] = {"role": "assistant", "content": reply}
                    progress = ReplyProgress(tokens=event.completion_tokens)
                    yield updated, GENERATING.format(tokens=event.completion_tokens), gr.skip(), progress
                else:
                    updated[-1] = {"role": "assistant", "content": reply}
                    yield updated, format_stats(event), gr.skip(), ENDED
        except EngineError as error:
            # A toast rather than gr.Error: an error would cover the whole conversation with Gradio's error overlay.
            gr.Warning(error.message)
            if reply:  # failed midway (a timeout): keep what came, say why it ended
                yield updated, f"Stopped: {error.message}", gr.skip(), ENDED
            else:  # refused (too long, queue full): take the message back into the box, to shorten or resend
                yield earlier, f"Not sent: {error.message}", message, ENDED

    # The quick steps before a reply: each returns the message box, the conversation, the stats line and the reply's
    # progress (a new reply is waiting for its first token).

    @staticmethod
    def add_user_message(message: str, history: History | None) -> tuple[Any, History, str, ReplyProgress]:
        try:
            if not check_text(message, "message").strip():
                raise gr.Error("Type a message first.", print_exception=False)
            updated = conversation.with_user_message(history, message)
        except EngineError as error:
            raise gr.Error(error.message, print_exception=False) from error
        return gr.update(value="", interactive=False), updated, WAITING, ReplyProgress()

    @staticmethod
    def use_example(example: gr.SelectData, history: History | None) -> tuple[Any, History, str, ReplyProgress]:
        text = example.value.get("text", "") if isinstance(example.value, dict) else str(example.value)
        return Handlers.add_user_message(text, history)

    @staticmethod
    def regenerate(history: History | None) -> tuple[Any, History, str, ReplyProgress]:
        """Drop the last reply (the user's message stays) so that `respond` writes a new one."""
        try:
            updated = conversation.regenerate(history)
        except EngineError as error:
            raise gr.Error(error.message, print_exception=False) from error
        return gr.update(interactive=False), updated, WAITING, ReplyProgress()

    @staticmethod
    def edit(edited: gr.EditData, history: History) -> tuple[Any, History, str, ReplyProgress]:
        """The user changed one of their messages: the conversation restarts from it."""
        try:
            earlier, text = conversation.edit(history, edited.index, edited.value)
        except EngineError as error:
            raise gr.Error(error.message, print_exception=False) from error
        return Handlers.add_user_message(text, earlier)

    @staticmethod
    def undo(history: History | None) -> tuple[History, str, str]:
        """Take back the last message and its reply; the message returns to the box, to edit and send again."""
        try:
            earlier, message = conversation.undo(history)
        except EngineError as error:
            raise gr.Error(error.message, print_exception=False) from error
        return earlier, gr.skip() if message is None else message, ""

    @staticmethod
    def clear() -> tuple[History, str, str]:
        return conversation.clear(), "", ""

    @staticmethod
    def reply_ended(progress: ReplyProgress | None) -> tuple[Any, Any, ReplyProgress]:
        """After a reply, however it ended: the message box takes input again; a stopped reply says so."""
        stats = stopped_stats(progress)
        return gr.update(interactive=True), gr.skip() if stats is None else stats, ENDED

    # ----- completion ---------------------------------------------------------------------------------------------

    async def complete(self, inputs: dict[Component, Any]) -> AsyncIterator[tuple[str, str, ReplyProgress]]:
        """The playground's completion box: the prompt and its continuation stream in, then the stats (and the
        progress, for `completion_ended`)."""
        text = ""
        try:
            params = self._playground_params(inputs)
            prepared = await self._prepare_completion(inputs[self.ui.prompt])
            yield "", WAITING, ReplyProgress()
            async for event in self.engine.stream(prepared, params, route="gradio:playground"):
                if isinstance(event, TextChunk):
                    text += event.text
                    yield (
                        text,
                        GENERATING.format(tokens=event.completion_tokens),
                        ReplyProgress(event.completion_tokens),
                    )
                else:
                    yield text, format_stats(event), ENDED
        except EngineError as error:
            gr.Warning(error.message)
            yield text, f"{'Stopped' if text else 'Not sent'}: {error.message}", ENDED

    @staticmethod
    def completion_ended(progress: ReplyProgress | None) -> tuple[Any, ReplyProgress]:
        stats = stopped_stats(progress)
        return gr.skip() if stats is None else stats, ENDED

    # ----- parameters and the model panel -------------------------------------------------------------------------

    def preset(self, name: str | None) -> tuple[Any, ...]:
        """The values of the sliders a preset sets, in PRESET_KNOBS order."""
        values: dict[str, Any]
        if name == "balanced":
            settings = self.settings
            values = {
                "temperature": settings.default_temperature,
                "top_p": settings.default_top_p,
                "top_k": min(settings.default_top_k, TOP_K_SLIDER_MAX),
                "repetition_penalty": 1.0,
            }
        else:
            values = PRESETS.get(name or "", {})
        return tuple(values.get(knob, gr.skip()) for knob in PRESET_KNOBS)

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
