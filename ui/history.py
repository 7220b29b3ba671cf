"""The playground's conversation as plain data: Gradio 6 Chatbot messages in, checked lists and strings out.

No Gradio and no engine here, so each function is tested on its own (tests/test_history.py). Bad input raises
InvalidRequestError naming `history` (or `stop`); the handlers turn it into what the page shows.
"""

from __future__ import annotations

from typing import Any

from inference.errors import InvalidRequestError
from inference.prompts import ChatMessage
from inference.text import check_text

History = list[dict[str, Any]]

HISTORY_SHAPE = '`history` must be a list of messages like {"role": "user", "content": "Hello"}'


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
    """What the chat template gets: the system prompt (if any), the conversation, then the new message."""
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


def with_user_message(history: History | None, message: str) -> History:
    """The conversation with the user's new message at its end."""
    return [*history_turns(history), {"role": "user", "content": message}]


def regenerate(history: History | None) -> History:
    """The conversation up to the user's last message, its reply dropped, so that a new reply can be written."""
    earlier, message = split_last_turn(history)
    if not message:
        raise InvalidRequestError("There is no message to answer again yet.", param="history")
    return with_user_message(earlier, message)


def undo(history: History | None) -> tuple[History, str | None]:
    """The conversation without the user's last message and its reply, and that message (None: nothing to undo)."""
    earlier, message = split_last_turn(history)
    if not message:
        return list(history or []), None
    return earlier, message


def edit(history: History | None, index: Any, content: Any) -> tuple[History, str]:
    """The user changed their message at `index`: the conversation before it, and the new text."""
    text = flatten_content(content)
    turns = history_turns(history)
    position = index[0] if isinstance(index, (list, tuple)) else index
    return turns[: position if isinstance(position, int) else len(turns)], text


def clear() -> History:
    return []
