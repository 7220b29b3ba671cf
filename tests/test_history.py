"""ui/history.py: the playground's conversation as plain data, without Gradio or an engine."""

from __future__ import annotations

from typing import Any

import pytest

from inference.errors import InvalidRequestError
from ui import history
from ui.history import History

CONVERSATION: History = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a joke"}]},
    {"role": "assistant", "content": "No."},
]


def test_flatten_content_joins_text_parts() -> None:
    assert history.flatten_content("plain") == "plain"
    assert history.flatten_content([{"type": "text", "text": "a"}, {"text": "b"}, "c"]) == "abc"


@pytest.mark.parametrize("content", [None, 42, [{"type": "image", "url": "x.png"}], [{"type": "text", "text": 3}]])
def test_flatten_content_refuses_anything_but_text(content: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        history.flatten_content(content)
    assert caught.value.param == "history"


def test_flatten_content_refuses_text_the_tokenizer_cannot_take() -> None:
    with pytest.raises(InvalidRequestError):
        history.flatten_content("lone \ud800 surrogate")


@pytest.mark.parametrize(
    "bad", ["hello", [{"role": "system", "content": "x"}], [{"content": "no role"}], ["just text"], {"role": "user"}]
)
def test_history_turns_refuses_other_shapes(bad: Any) -> None:
    with pytest.raises(InvalidRequestError, match="list of messages") as caught:
        history.history_turns(bad)
    assert caught.value.param == "history"


def test_history_turns_accepts_none_as_empty() -> None:
    assert history.history_turns(None) == []
    assert history.history_turns(CONVERSATION) == CONVERSATION


def test_to_messages_puts_the_system_prompt_first_and_the_message_last() -> None:
    messages = history.to_messages("  Be brief.  ", CONVERSATION[:2], "Why?")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Why?"},
    ]


def test_to_messages_leaves_out_a_blank_system_prompt_and_an_empty_message() -> None:
    assert history.to_messages("   ", None, "") == []
    assert history.to_messages(None, CONVERSATION[2:3], None) == [{"role": "user", "content": "Tell me a joke"}]


def test_parse_stop_reads_one_string_a_line_with_escapes() -> None:
    assert history.parse_stop("\\n\nzzz\n\nend\\t") == ["\n", "zzz", "end\t"]
    assert history.parse_stop("") is None
    assert history.parse_stop(None) is None


def test_split_last_turn_finds_the_users_last_message() -> None:
    earlier, message = history.split_last_turn(CONVERSATION)
    assert earlier == CONVERSATION[:2]
    assert message == "Tell me a joke"


def test_split_last_turn_joins_consecutive_user_messages() -> None:
    turns: History = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    assert history.split_last_turn(turns) == ([], "one\ntwo")
    assert history.split_last_turn([]) == ([], "")
    assert history.split_last_turn([{"role": "assistant", "content": "Hi!"}]) == ([], "")


def test_with_user_message_appends_and_checks_the_shape() -> None:
    assert history.with_user_message(None, "Hi") == [{"role": "user", "content": "Hi"}]
    with pytest.raises(InvalidRequestError):
        history.with_user_message("not a list", "Hi")


def test_regenerate_drops_the_last_reply_and_keeps_the_message() -> None:
    assert history.regenerate(CONVERSATION) == [*CONVERSATION[:2], {"role": "user", "content": "Tell me a joke"}]
    with pytest.raises(InvalidRequestError, match="no message to answer again"):
        history.regenerate([])


def test_undo_takes_back_the_last_message_and_its_reply() -> None:
    assert history.undo(CONVERSATION) == (CONVERSATION[:2], "Tell me a joke")
    assert history.undo([]) == ([], None)
    assert history.undo(None) == ([], None)


def test_edit_restarts_the_conversation_from_the_edited_message() -> None:
    assert history.edit(CONVERSATION, 2, "Tell me a story") == (CONVERSATION[:2], "Tell me a story")
    assert history.edit(CONVERSATION, [0, 0], [{"type": "text", "text": "Hey"}]) == ([], "Hey")
    # no usable index: the new message goes after the whole conversation
    assert history.edit(CONVERSATION, None, "More") == (CONVERSATION, "More")


def test_clear_empties_the_conversation() -> None:
    assert history.clear() == []


def test_a_stopped_reply_says_how_far_it_got() -> None:
    from ui.handlers import ENDED, ReplyProgress, stopped_stats

    assert stopped_stats(ReplyProgress()) == "Stopped before the first token."
    assert stopped_stats(ReplyProgress(tokens=7)) == "Stopped after 7 tokens."
    assert stopped_stats(ENDED) is None  # it ended on its own: its stats line stays
    assert stopped_stats(None) is None  # no progress kept (a new session): the line stays too
