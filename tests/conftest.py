"""Shared fixtures: tiny random GPT-2 and Llama models saved to disk, settings for them, and running engines."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

# The hub is unreachable here and in CI; make sure nothing tries it. Set before transformers is imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from inference.client import EngineClient, RequestHandleBase
from inference.engine import Engine
from inference.params import SamplingParams
from inference.prompts import PreparedPrompt
from inference.settings import Settings
from tests.tiny_models import build_tiny_model

if TYPE_CHECKING:  # importing it loads the app (FastAPI, Gradio), which engine-only test runs don't need
    from tests.live_server import LiveServer

SettingsFactory = Callable[..., Settings]


@pytest.fixture
def own_kernels() -> None:
    """Skips a test of our C++ kernels where they can't load (no AVX2); CI's machine has it, and there
    test_quantization.py::test_our_integer_kernels_build_and_load_here fails if they don't build."""
    from inference import integer_kernels

    if integer_kernels.load() is not None:
        pytest.skip(f"our kernels are unavailable: {integer_kernels.load()}")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE: no pad token, no chat template, eos `<|endoftext|>`."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with a byte-level BPE: pad `<pad>`, eos `<|im_end|>`, a ChatML chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def make_settings(model_cache_dir: Path) -> SettingsFactory:
    """`make_settings(folder, **overrides)`: Settings for a tiny model, with one torch thread and a short batch wait.

    Always float32 weights (whatever DTYPE and QUANTIZATION say): a randomly initialised tiny model has near-tied
    logits, and the tests compare exact tokens to check the engine's logic, not the precision of a weight format.
    Decoders are built at every load, not saved (test_saved_decoders.py turns saving on): a test that changes how
    one is built must not get one built by an earlier test.
    """

    def factory(folder: Path | str, **overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "model_id": str(folder),
            "model_cache_dir": model_cache_dir,
            "torch_threads": 1,
            "batch_wait_ms": 5,
            "dtype": "float32",
            "quantization": "none",
            "save_built_decoder": False,
        }
        values.update(overrides)
        return Settings(**values)

    return factory


def _started(settings: Settings) -> Engine:
    engine = Engine(settings)
    engine.start()
    return engine


@pytest.fixture(scope="session")
def gpt2_engine(tiny_gpt2_dir: Path, make_settings: SettingsFactory) -> Iterator[Engine]:
    engine = _started(make_settings(tiny_gpt2_dir))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="session")
def llama_engine(tiny_llama_dir: Path, make_settings: SettingsFactory) -> Iterator[Engine]:
    engine = _started(make_settings(tiny_llama_dir))
    yield engine
    engine.shutdown()


@pytest.fixture(params=["gpt2", "llama"])
def tiny_engine(request: pytest.FixtureRequest) -> Engine:
    """Each shared tiny engine in turn (tests using it run once per model)."""
    engine: Engine = request.getfixturevalue(f"{request.param}_engine")
    return engine


@pytest.fixture
def make_engine(make_settings: SettingsFactory) -> Iterator[Callable[..., Engine]]:
    """`make_engine(folder, **overrides)`: a started engine with its own settings, shut down after the test."""
    engines: list[Engine] = []

    def factory(folder: Path | str, **overrides: Any) -> Engine:
        engine = _started(make_settings(folder, **overrides))
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        engine.shutdown()


@pytest.fixture(scope="module")
def http(server: LiveServer) -> Iterator[httpx.Client]:
    """An HTTP client for the test module's own `server` (each web-layer module starts the server it needs)."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@dataclass
class Submission:
    route: str
    params: SamplingParams


@pytest.fixture
def submissions(server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> list[Submission]:
    """Every request the test module's `server` hands its engine from now on: the route and the sampling parameters,
    as the engine receives them (what the playground and the Gradio endpoints send is observed there)."""
    engine: EngineClient = server.app.state.engine
    submit = engine.submit
    seen: list[Submission] = []

    def recording_submit(prompt: PreparedPrompt, params: SamplingParams, **options: Any) -> RequestHandleBase:
        seen.append(Submission(options.get("route", "-"), params))
        return submit(prompt, params, **options)

    monkeypatch.setattr(engine, "submit", recording_submit)
    return seen
