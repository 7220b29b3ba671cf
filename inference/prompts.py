"""Prompts to token ids: a chat model's own template, or a plain transcript for base models that have none."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypedDict

from transformers import PreTrainedTokenizerBase

from inference.errors import InvalidRequestError

ROLES = ("system", "user", "assistant")
# Base models continue a transcript; this stops them before they write the user's next line themselves.
TRANSCRIPT_STOPS = ("\nUser:",)


class ChatMessage(TypedDict):
    role: str
    content: str


def check_messages(messages: list[ChatMessage]) -> None:
    if not messages:
        raise InvalidRequestError("`messages` cannot be empty", param="messages")
    for message in messages:
        if message.get("role") not in ROLES:
            raise InvalidRequestError(f"each message's `role` must be one of {', '.join(ROLES)}", param="messages")
        if not isinstance(message.get("content"), str):
            raise InvalidRequestError("each message's `content` must be a string", param="messages")
    if messages[-1]["role"] == "assistant":
        raise InvalidRequestError("the last message must be from the user (or the system)", param="messages")


def transcript(messages: list[ChatMessage]) -> str:
    """The plain-text conversation a base model (no chat template) continues as the assistant."""
    lines = [f"{message['role'].capitalize()}: {message['content'].strip()}" for message in messages]
    return "\n".join(lines) + "\nAssistant:"


@dataclass(frozen=True)
class PreparedPrompt:
    """Token ids ready for the engine, and stop strings the prompt's format needs (the transcript's `\nUser:`)."""

    token_ids: list[int]
    extra_stops: tuple[str, ...] = ()


class PromptFormatter:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_completion(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt)["input_ids"])

    def encode_chat(self, messages: list[ChatMessage]) -> tuple[list[int], tuple[str, ...]]:
        """Token ids of the conversation, ready for the assistant's reply, and stop strings the format needs."""
        check_messages(messages)
        if not self.has_chat_template:
            return self.encode_completion(transcript(messages)), TRANSCRIPT_STOPS
        conversation = [{"role": message["role"], "content": message["content"]} for message in messages]
        encoded: Any = self.tokenizer.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        return list(encoded["input_ids"]), ()

    def prepare_completion(self, prompt: str) -> PreparedPrompt:
        return PreparedPrompt(self.encode_completion(prompt))

    def prepare_chat(self, messages: list[ChatMessage]) -> PreparedPrompt:
        ids, stops = self.encode_chat(messages)
        return PreparedPrompt(ids, stops)

    def token_pieces(self, token_ids: list[int]) -> list[str]:
        """Each token as the tokenizer spells it (byte-level pieces show spaces as `Ġ`)."""
        return [str(piece) for piece in self.tokenizer.convert_ids_to_tokens(token_ids)]
