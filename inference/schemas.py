"""What the engine itself reports: the loaded model, its weights and the limits this server enforces (/model-info).

The HTTP request and response shapes live beside their routes, in api/protocol.py and api/openai_protocol.py.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ServerLimits(BaseModel):
    max_input_tokens: int
    max_new_tokens: int
    max_batch_size: int
    max_batch_tokens: int
    max_queue_size: int
    max_prompts: int
    max_concurrent_tokenizing: int
    max_stop_sequences: int
    max_stop_length: int
    max_n: int
    max_body_bytes: int
    request_timeout_s: float


class QualityInfo(BaseModel):
    """The weights measured against float32 on the built-in check text, at start-up."""

    perplexity_float32: float
    perplexity: float
    top1_agreement: float = Field(description="Share of positions whose likeliest next token is float32's.")


class WeightsInfo(BaseModel):
    format: Literal["none", "float16", "int8", "int4"] = Field(
        description="QUANTIZATION as served; `none` is plain `dtype`."
    )
    reason: str
    quality: QualityInfo | None = Field(
        description="How these weights compare with float32 (for int4, int8 and float16)."
    )
    seconds: float = Field(description="Start-up time spent calibrating, checking and packing them.")


class ModelInfo(BaseModel):
    model_id: str
    source: Literal["folder", "package", "hub"]
    location: str
    architecture: str
    parameters: int
    dtype: str
    weights: WeightsInfo
    forward: Literal["lean", "transformers"] = Field(
        description="`lean`: this app's own forward pass for Llama models (LEAN_FORWARD); else transformers'."
    )
    kv_cache_dtype: str = Field(
        description="What the running batch keeps keys and values in: float16 where the lean forward of a quantized "
        "format decodes with our attention kernel, else the model's dtype."
    )
    device: str
    context_length: int
    has_chat_template: bool
    limits: ServerLimits
    version: str
