"""build_sampling_params: defaults come from the settings, and every bad value is refused naming its parameter."""

from __future__ import annotations

import math
from typing import Any

import pytest

from inference.errors import InvalidRequestError
from inference.params import MAX_SEED, MAX_TEMPERATURE, MAX_TOP_K, SamplingParams, build_sampling_params, knob_range
from inference.settings import Settings


@pytest.fixture
def settings() -> Settings:
    return Settings(max_new_tokens=256, max_stop_sequences=4, max_stop_length=16)


def test_defaults_come_from_settings() -> None:
    settings = Settings(
        default_temperature=0.3, default_top_p=0.8, default_top_k=7, default_max_new_tokens=33, max_new_tokens=100
    )
    params = build_sampling_params(settings)
    assert params == SamplingParams(
        max_new_tokens=33, temperature=0.3, top_p=0.8, top_k=7, repetition_penalty=1.0, seed=None, stop=()
    )
    assert not params.greedy


def test_default_max_new_tokens_is_capped_by_the_server_limit() -> None:
    params = build_sampling_params(Settings(default_max_new_tokens=300, max_new_tokens=40))
    assert params.max_new_tokens == 40


def test_explicit_values_are_kept_and_normalised(settings: Settings) -> None:
    params = build_sampling_params(
        settings,
        max_new_tokens=5,
        temperature=0,
        top_p=1,
        top_k=0,
        repetition_penalty=1.3,
        seed=42,
        stop=["b", "a", "b"],
    )
    assert params.max_new_tokens == 5
    assert isinstance(params.max_new_tokens, int)
    assert params.temperature == 0.0
    assert isinstance(params.temperature, float)
    assert params.greedy
    assert params.top_p == 1.0
    assert params.top_k == 0
    assert params.repetition_penalty == 1.3
    assert params.seed == 42
    assert params.stop == ("b", "a")  # duplicates dropped, order kept


def test_a_single_stop_string_becomes_a_tuple(settings: Settings) -> None:
    assert build_sampling_params(settings, stop="\n\n").stop == ("\n\n",)


def test_edges_of_the_ranges_are_accepted(settings: Settings) -> None:
    params = build_sampling_params(
        settings, max_new_tokens=256, temperature=2.0, top_p=1e-6, top_k=1000, repetition_penalty=10.0, seed=MAX_SEED
    )
    assert params.max_new_tokens == 256
    assert params.top_k == 1000
    assert params.seed == MAX_SEED
    assert build_sampling_params(settings, max_new_tokens=1, seed=0).seed == 0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("temperature", -1),
        ("temperature", 3),
        ("temperature", 2.0001),
        ("temperature", math.nan),
        ("temperature", math.inf),
        ("temperature", True),
        ("temperature", "0.5"),
        pytest.param("temperature", 10**400, id="temperature-huge-int"),  # too large for a float
        ("top_p", 0),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_p", math.nan),
        ("top_p", False),
        ("top_k", -1),
        ("top_k", 1.5),
        ("top_k", 1001),
        ("top_k", math.inf),
        ("top_k", True),
        ("max_new_tokens", 0),
        ("max_new_tokens", -5),
        ("max_new_tokens", 257),
        ("max_new_tokens", 2.5),
        ("max_new_tokens", math.nan),
        ("max_new_tokens", math.inf),
        ("max_new_tokens", True),
        ("max_new_tokens", "10"),
        pytest.param("max_new_tokens", 10**400, id="max_new_tokens-huge-int"),  # too large for a float
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", 10.5),
        ("repetition_penalty", math.nan),
        ("seed", -1),
        ("seed", 1.5),
        ("seed", MAX_SEED + 1),
        pytest.param("seed", 10**400, id="seed-huge-int"),  # too large for a float
        ("seed", math.nan),
        ("seed", True),
        ("seed", "7"),
    ],
)
def test_bad_values_are_refused_naming_the_parameter(settings: Settings, name: str, value: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        build_sampling_params(settings, **{name: value})
    assert caught.value.param == name
    assert f"`{name}`" in caught.value.message
    assert caught.value.type == "invalid_request_error"


def test_integral_floats_are_accepted_for_integer_parameters(settings: Settings) -> None:
    params = build_sampling_params(settings, max_new_tokens=10.0, top_k=3.0, seed=5.0)
    assert (params.max_new_tokens, params.top_k, params.seed) == (10, 3, 5)
    assert all(isinstance(value, int) for value in (params.max_new_tokens, params.top_k, params.seed))


@pytest.mark.parametrize(
    "stop",
    [
        ["a", "b", "c", "d", "e"],  # more than max_stop_sequences (4)
        [""],
        "",
        ["ok", ""],
        ["x" * 17],  # longer than max_stop_length (16)
        ["ok", 3],
        5,
        {"a": 1},
    ],
)
def test_bad_stop_strings_are_refused(settings: Settings, stop: Any) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        build_sampling_params(settings, stop=stop)
    assert caught.value.param == "stop"


def test_stop_limits_come_from_settings() -> None:
    settings = Settings(max_stop_sequences=2, max_stop_length=3)
    assert build_sampling_params(settings, stop=["abc", "de"]).stop == ("abc", "de")
    with pytest.raises(InvalidRequestError, match="at most 2"):
        build_sampling_params(settings, stop=["a", "b", "c"])
    with pytest.raises(InvalidRequestError, match="at most 3 characters"):
        build_sampling_params(settings, stop=["abcd"])


def test_no_stop_strings_allowed_when_the_limit_is_zero() -> None:
    settings = Settings(max_stop_sequences=0)
    assert build_sampling_params(settings).stop == ()
    with pytest.raises(InvalidRequestError):
        build_sampling_params(settings, stop=["x"])


def test_refusals_name_the_knob_as_the_caller_does(settings: Settings) -> None:
    names = {"max_new_tokens": "max_tokens"}
    with pytest.raises(InvalidRequestError) as caught:
        build_sampling_params(settings, names=names, max_new_tokens=10**6)
    assert caught.value.param == "max_tokens"
    assert caught.value.message == "`max_tokens` must be between 1 and 256, got 1000000"
    with pytest.raises(InvalidRequestError) as caught:
        build_sampling_params(settings, names=names, max_new_tokens="12")
    assert (caught.value.param, caught.value.message) == ("max_tokens", "`max_tokens` must be a number")


def test_one_set_of_defaults() -> None:
    """SamplingParams() samples as a request that gives no knob does, with the settings' built-in defaults."""
    assert build_sampling_params(Settings()) == SamplingParams()


def test_settings_defaults_keep_to_the_knobs_bounds() -> None:
    with pytest.raises(ValueError, match="default_top_p"):
        Settings(default_top_p=0)
    with pytest.raises(ValueError, match="default_temperature"):
        Settings(default_temperature=2.5)


def test_knob_ranges_come_from_their_declarations() -> None:
    assert knob_range("temperature") == (0, MAX_TEMPERATURE)
    assert knob_range("top_p") == (0, 1)
    assert knob_range("top_k") == (0, MAX_TOP_K)
    assert knob_range("max_new_tokens") == (1, math.inf)  # capped by the MAX_NEW_TOKENS setting instead
    assert knob_range("seed") == (0, MAX_SEED)


def test_only_knobs_are_taken(settings: Settings) -> None:
    with pytest.raises(TypeError, match="max_length"):
        build_sampling_params(settings, max_length=5)
