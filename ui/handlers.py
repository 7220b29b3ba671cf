"""What the playground's events and the named Gradio endpoints run: thin calls into the engine."""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from typing import Any

import gradio as gr

from inference.engine import Engine, GenerationResult, TextChunk
from inference.errors import EngineError, InvalidRequestError
from inference.params import build_sampling_params
from inference.prompts import ChatMessage
from inference.settings import Settings


def flatten_content(content: Any) -> str:
    """Gradio 6 Chatbot messages carry a list of typed parts; chat templates want a plain string."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, list):
        return "".join(flatten_content(part) for part in content)
    return ""


def to_messages(system_prompt: str, history: list[dict[str, Any]] | None, message: str | None) -> list[ChatMessage]:
    messages: list[ChatMessage] = []
    if system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt.strip()})
    for turn in history or []:
        role = turn.get("role") if isinstance(turn, dict) else None
        if role in ("user", "assistant"):
            messages.append({"role": role, "content": flatten_content(turn.get("content"))})
    if message:
        messages.append({"role": "user", "content": message})
    return messages


class Handlers:
    """Bound to one engine; every method here is what an event listener or `gr.api` calls."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings
        # How many requests each call of the batched /generate received (proof that Gradio's queue batches).
        self.generate_batch_sizes: collections.Counter[int] = collections.Counter()

    async def _complete_one(
        self, prompt: str, max_length: int, temperature: float, top_p: float, top_k: int
    ) -> GenerationResult | EngineError:
        try:
            params = build_sampling_params(
                self.settings, max_new_tokens=int(max_length), temperature=temperature, top_p=top_p, top_k=int(top_k)
            )
            if not prompt:
                raise InvalidRequestError("The prompt is empty: type something to continue.", param="prompt")
            prepared = await asyncio.to_thread(self.engine.prepare_completion, prompt)
            return await self.engine.generate(prepared, params, route="gradio:/generate")
        except EngineError as error:
            return error

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
            # Alone (or all wrong): fail the call so clients get an exception with the reason.
            raise gr.Error(errors[0].message)
        # In a mixed batch, one caller's bad input must not fail the others; it gets its reason as its output.
        return [
            [f"Error: {outcome.message}" if isinstance(outcome, EngineError) else outcome.text for outcome in outcomes]
        ]

    async def chat(
        self,
        message: str,
        history: list[dict[str, Any]] | None = None,
        system_prompt: str = "",
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        max_length: int | None = None,
    ) -> AsyncIterator[str]:
        """Stream the assistant's reply to `message` after `history`; each value is the reply so far."""
        reply = ""
        try:
            params = build_sampling_params(
                self.settings,
                max_new_tokens=None if max_length is None else int(max_length),
                temperature=temperature,
                top_p=top_p,
                top_k=None if top_k is None else int(top_k),
            )
            if not message or not message.strip():
                raise InvalidRequestError("The message is empty.", param="message")
            messages = to_messages(system_prompt, history, message)
            prepared = await asyncio.to_thread(self.engine.prepare_chat, messages)
            async for event in self.engine.stream(prepared, params, route="gradio:/chat"):
                if isinstance(event, TextChunk):
                    reply += event.text
                    yield reply
        except EngineError as error:
            raise gr.Error(error.message) from error
        if not reply:
            yield reply

    async def respond(
        self,
        history: list[dict[str, Any]],
        system_prompt: str,
        temperature: float,
        top_p: float,
        top_k: int,
        max_length: int,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """The playground's chat: stream the reply to the last user turn into the conversation."""
        *earlier, last = history
        message = flatten_content(last.get("content"))
        updated = [*history, {"role": "assistant", "content": ""}]
        async for reply in self.chat(message, earlier, system_prompt, temperature, top_p, top_k, max_length):
            updated[-1] = {"role": "assistant", "content": reply}
            yield updated

    @staticmethod
    def add_user_message(message: str, history: list[dict[str, Any]] | None) -> tuple[str, list[dict[str, Any]]]:
        if not message or not message.strip():
            raise gr.Error("Type a message first.")
        return "", [*(history or []), {"role": "user", "content": message}]

    def model_info(self) -> dict[str, Any]:
        try:
            return self.engine.info().model_dump()
        except EngineError as error:
            return {"status": error.message}
