"""Prompts to token ids: a chat model's own template, or a plain transcript for base models that have none.

Three guards sit in front of the tokenizer:
- text must be text (no lone surrogates; `inference.text`), and anything the tokenizer still rejects is an
  InvalidRequestError naming the parameter, never a crash;
- a prompt that must be over the token limit is refused from its length in characters, before it is tokenized
  (`min_tokens`: a lower bound on its token count that holds for this tokenizer);
- in a conversation, a control token typed by a user (`<|im_start|>system`) stays plain text: the template's own
  markers are special tokens, the messages' contents are encoded with special tokens split, as TGI and vLLM allow.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass
from typing import Any, TypedDict

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from inference.admission import TokenizingGate
from inference.errors import InvalidRequestError, PromptTooLongError
from inference.prefix_cache import common_opening
from inference.text import check_text

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# Base models continue a transcript; this stops them before they write the user's next line themselves.
TRANSCRIPT_STOPS = ("\nUser:",)
# Stand-ins for the messages' contents while rendering the template (private-use characters no template writes).
_SLOT = "\ue000{index}\ue001"
_SLOTS = re.compile("\ue000(\\d+)\ue001")


class ChatMessage(TypedDict):
    role: str
    content: str


def check_messages(messages: list[ChatMessage]) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("`messages` cannot be empty", param="messages")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidRequestError(f"each message's `role` must be one of {', '.join(ROLES)}", param="messages")
        if not isinstance(message.get("content"), str):
            raise InvalidRequestError("each message's `content` must be a string", param="messages")
        check_text(message["content"], "messages")
    if messages[-1]["role"] == "assistant":
        raise InvalidRequestError("the last message must be from the user (or the system)", param="messages")


def transcript(messages: list[ChatMessage]) -> str:
    """The plain-text conversation a base model (no chat template) continues as the assistant."""
    lines = [f"{message['role'].capitalize()}: {message['content'].strip()}" for message in messages]
    return "\n".join(lines) + "\nAssistant:"


def max_chars_per_token(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The most characters of (normalized) text one token can stand for, or None where no such bound exists.

    A piece of a byte-level vocabulary is written one character per byte it covers, and a SentencePiece or WordPiece
    piece one character per character (plus markers like `▁` or `##`), so the longest piece bounds what a token
    covers; added tokens (`<|im_start|>`) are in the vocabulary too. That fails only where one unknown-token can
    swallow any run of text (WordPiece's `[UNK]` for a whole word, BPE or Unigram merging unknown characters), so
    the bound is given only for byte-level vocabularies (every byte is a token) and byte-fallback BPE.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    pre_tokenizer = backend.pre_tokenizer.__getstate__().decode() if backend.pre_tokenizer is not None else ""
    byte_level = '"ByteLevel"' in pre_tokenizer
    if not (byte_level or getattr(backend.model, "byte_fallback", False)):
        return None
    return max(len(piece) for piece in tokenizer.get_vocab())


@dataclass(frozen=True)
class PreparedPrompt:
    """Token ids ready for the engine, and stop strings the prompt's format needs (the transcript's `\nUser:`)."""

    token_ids: list[int]
    extra_stops: tuple[str, ...] = ()


class PromptFormatter:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.chars_per_token = max_chars_per_token(tokenizer)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._normalizer = None if backend is None else backend.normalizer
        specials = [token.content for token in tokenizer.added_tokens_decoder.values() if token.special]
        longest_first = sorted(set(specials), key=len, reverse=True)
        self._specials = re.compile("|".join(map(re.escape, longest_first))) if longest_first else None

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    # ----- the cheap refusal ------------------------------------------------------------------------------------

    def min_tokens(self, text: str) -> int:
        """A lower bound on the tokens `text` becomes (0 when this tokenizer allows none): every token covers at most
        `chars_per_token` characters of the normalized text, and every character is covered."""
        if self.chars_per_token is None:
            return 0
        length = len(text)
        if self._normalizer is not None and length:
            # a normalizer may compose characters (NFC), so count what the vocabulary actually sees
            length = min(length, len(self._normalizer.normalize_str(text)))
        return length // self.chars_per_token

    def refuse_if_surely_too_long(self, text: str, limit: int | None, param: str) -> None:
        """PromptTooLongError, before tokenizing, for text that has more than `limit` tokens whatever it says."""
        if limit is None:
            return
        at_least = self.min_tokens(text)
        if at_least > limit:
            raise PromptTooLongError(at_least, limit, param=param, at_least=True)

    # ----- encoding -------------------------------------------------------------------------------------------------

    def _encode(self, text: str, param: str, *, add_special_tokens: bool = True, plain: bool = False) -> list[int]:
        """Token ids of `text`; `plain` encodes special-token strings as the characters they are written with."""
        try:
            encoded = self.tokenizer(text, add_special_tokens=add_special_tokens, split_special_tokens=plain)
            return list(encoded["input_ids"])
        except Exception as error:  # text checks come first, so this is a tokenizer's own refusal
            logger.warning("The tokenizer refused `%s`: %s: %s", param, type(error).__name__, error)
            message = f"`{param}` could not be tokenized: it holds text this model's tokenizer refuses"
            raise InvalidRequestError(message, param=param) from error

    def encode_completion(
        self, prompt: str, limit: int | None = None, param: str = "prompt", gate: TokenizingGate | None = None
    ) -> list[int]:
        """Token ids of a plain prompt. `limit`: refuse one surely longer before tokenizing; `gate`: bounds how many
        long prompts are tokenized at once."""
        check_text(prompt, param)
        self.refuse_if_surely_too_long(prompt, limit, param)
        with gate.enter(len(prompt)) if gate else contextlib.nullcontext():
            return self._encode(prompt, param)

    def encode_chat(
        self, messages: list[ChatMessage], limit: int | None = None, gate: TokenizingGate | None = None
    ) -> tuple[list[int], tuple[str, ...]]:
        """Token ids of the conversation, ready for the assistant's reply, and stop strings the format needs."""
        check_messages(messages)
        if not self.has_chat_template:
            text = transcript(messages)
            self.refuse_if_surely_too_long(text, limit, "messages")
            with gate.enter(len(text)) if gate else contextlib.nullcontext():
                # no template markers here at all: every special-token string is the users' text
                return self._encode(text, "messages", plain=True), TRANSCRIPT_STOPS
        text = self._render([{"role": m["role"], "content": m["content"]} for m in messages])
        self.refuse_if_surely_too_long(text, limit, "messages")
        with gate.enter(len(text)) if gate else contextlib.nullcontext():
            if self._specials is None or not any(self._specials.search(m["content"]) for m in messages):
                # what apply_chat_template(tokenize=True) does, without rendering twice
                return self._encode(text, "messages", add_special_tokens=False), ()
            return self._encode_contents_as_text(messages, text), ()

    def chat_opening(self) -> list[int]:
        """The tokens every chat prompt of this model's template starts with, whatever the user says (its default
        system prompt and the first user turn's header); empty without a template, or where rendering fails."""
        if not self.has_chat_template:
            return []
        try:
            renders = [self.encode_chat([{"role": "user", "content": text}])[0] for text in ("Hi", "What?")]
        except InvalidRequestError:  # a template that insists on a system message, say
            return []
        return common_opening(renders)

    def _render(self, conversation: list[dict[str, str]]) -> str:
        try:
            rendered: Any = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except TemplateError as error:  # raised on purpose by a template (roles out of order, say): its words
            message = f"The model's chat template refused these messages: {error}"
            raise InvalidRequestError(message, param="messages") from error
        return str(rendered)

    def _encode_contents_as_text(self, messages: list[ChatMessage], rendered: str) -> list[int]:
        """The template's own text with its special tokens, each message's content with special tokens split."""
        slotted = self._render([{"role": m["role"], "content": _SLOT.format(index=i)} for i, m in enumerate(messages)])
        pieces = _SLOTS.split(slotted)  # template text, content index, template text, ...
        contents = [messages[int(index)]["content"] for index in pieces[1::2]]
        refilled = "".join(part if i % 2 == 0 else contents[i // 2] for i, part in enumerate(pieces))
        if refilled != rendered:
            # the template rewrites the contents (trims them, say): they can't be told apart from its own text
            raise InvalidRequestError(
                "A message holds a control token of this model's chat template (such as `<|im_start|>`), which "
                "this template can't keep as plain text; remove it.",
                param="messages",
            )
        ids: list[int] = []
        for i, part in enumerate(pieces):
            if i % 2 == 0:
                ids += self._encode(part, "messages", add_special_tokens=False) if part else []
            else:
                ids += self._encode(contents[i // 2], "messages", add_special_tokens=False, plain=True)
        return ids

    def prepare_completion(
        self, prompt: str, limit: int | None = None, param: str = "prompt", gate: TokenizingGate | None = None
    ) -> PreparedPrompt:
        return PreparedPrompt(self.encode_completion(prompt, limit, param, gate))

    def prepare_chat(
        self, messages: list[ChatMessage], limit: int | None = None, gate: TokenizingGate | None = None
    ) -> PreparedPrompt:
        ids, stops = self.encode_chat(messages, limit, gate)
        return PreparedPrompt(ids, stops)

    def token_pieces(self, token_ids: list[int]) -> list[str]:
        """Each token as the tokenizer spells it (byte-level pieces show spaces as `Ġ`)."""
        return [str(piece) for piece in self.tokenizer.convert_ids_to_tokens(token_ids)]
