"""What counts as text: a `str` that can be written as UTF-8. JSON may carry a lone UTF-16 surrogate (`"\\ud800"`),
which Python keeps in a `str`, but no tokenizer (and no UTF-8 encoder) accepts it; it is refused at the edge, naming
the parameter, instead of failing deep inside tokenizing."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator
from pydantic_core import PydanticCustomError

from inference.errors import InvalidRequestError


def text_problem(value: object) -> str | None:
    """Why `value` is not text, in words for people, or None when it is."""
    if not isinstance(value, str):
        return "must be a string"
    if value.isascii():  # the common case, and cheap: no copy
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(value[error.start])
        return (
            f"is not valid Unicode text: it holds a lone surrogate (U+{code:04X}) at character {error.start}; "
            "send whole characters (surrogates only come in pairs)"
        )
    return None


def check_text(value: object, param: str) -> str:
    """`value` itself when it is text; else InvalidRequestError naming `param`."""
    problem = text_problem(value)
    if problem is not None:
        raise InvalidRequestError(f"`{param}` {problem}", param=param)
    assert isinstance(value, str)
    return value


def _text(value: str) -> str:
    problem = text_problem(value)
    if problem is not None:
        raise PydanticCustomError("invalid_text", problem)
    return value


# A string that can be tokenized and written back as UTF-8 (no lone surrogates): every text field of every request.
Text = Annotated[str, AfterValidator(_text)]


def printable(text: str) -> str:
    """`text` with any lone surrogate written as an escape, so it can go into a JSON response or a log line."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
