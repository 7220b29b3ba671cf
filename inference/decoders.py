"""How the engine runs the model: its forward pass (transformers' own, or the lean Llama one) and its weight format.

`build_decoder` turns a loaded transformers model into a `Decoder` and decides QUANTIZATION: with `auto` on a CPU it
tries int8, then float16 weights, and keeps the first that passes the quality check against float32 on a built-in
text (quantization.QualityCheck), so quality is checked on the machine and model it serves.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Literal, Protocol

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from inference import fast_llama
from inference.errors import ModelNotFoundError
from inference.kv_cache import SlotCache
from inference.quantization import QualityCheck, QuantizedFormat, compare, fbgemm_available, input_absmax, make_linear

logger = logging.getLogger(__name__)

WeightFormat = Literal["none", "float16", "int8"]
# Tokens of the built-in texts used at most (calibration and the quality check each take one forward pass).
CHECK_TOKENS = 512


class Decoder(Protocol):
    """What the engine asks of the model: prefill prompts of one length, decode one token per running row."""

    def prefill(self, prompts: list[list[int]]) -> tuple[DynamicCache, torch.Tensor]:
        """A fresh cache holding the prompts, and the logits after each prompt's last token."""
        ...

    def decode(
        self, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Feed each row's newest token ([rows, 1]) at its position; the logits of the token after it."""
        ...

    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits for one sequence [1, n] (the quality check's perplexity)."""
        ...


class TransformersDecoder:
    """transformers' own forward: works for every causal LM the slot cache supports."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> tuple[DynamicCache, torch.Tensor]:
        input_ids = torch.tensor(prompts, dtype=torch.long, device=self.model.device)
        output = self.model(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), cache=DynamicCache(), use_cache=True,
            logits_to_keep=1,
        )  # fmt: skip
        return output.cache, output.logits[:, -1, :]

    @torch.inference_mode()
    def decode(
        self, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        device = self.model.device
        output = self.model(
            input_ids=tokens.to(device), attention_mask=attention_mask.to(device), position_ids=positions.to(device),
            cache=cache, use_cache=True,
        )  # fmt: skip
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits

    @torch.inference_mode()
    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=token_ids.to(self.model.device)).logits
        return logits


@dataclass(frozen=True)
class WeightChoice:
    """The weight format serving the model, why, and what the quality check measured (None where it didn't run)."""

    format: WeightFormat
    reason: str
    quality: QualityCheck | None = None
    seconds: float = 0.0


def builtin_text(name: str) -> str:
    return (resources.files("inference") / "data" / name).read_text(encoding="utf-8")


def _linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if isinstance(module, nn.Linear | Conv1D)}


def _weight_and_bias(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight: torch.Tensor = module.get_parameter("weight").detach()
    if isinstance(module, Conv1D):  # GPT-2 stores its projections transposed
        weight = weight.T
    bias = module.bias.detach() if isinstance(module.bias, torch.Tensor) else None
    return weight, bias


def _factory(fmt: QuantizedFormat, absmax: dict[str, torch.Tensor]) -> fast_llama.LinearFactory:
    def make(weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> nn.Module:
        # the LM head is the layer most sensitive to int8 (its error lands straight on the logits): float16 there
        kind: QuantizedFormat = "float16" if name == "lm_head" else fmt
        return make_linear(kind, weight, bias, absmax.get(name))

    return make


def _swap_linears(model: nn.Module, make: fast_llama.LinearFactory) -> Callable[[], None]:
    """Replace every linear layer of a transformers model in place; returns how to put the originals back."""
    originals = _linear_layers(model)
    for name, module in originals.items():
        parent, _, child = name.rpartition(".")
        model.get_submodule(parent).register_module(child, make(*_weight_and_bias(module), name))

    def restore() -> None:
        for name, module in originals.items():
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).register_module(child, module)

    return restore


def _candidates(setting: str, device: torch.device, dtype: torch.dtype) -> list[WeightFormat]:
    """The formats to try, best first; an explicit one that can't run here is a configuration error."""
    usable = device.type == "cpu" and dtype == torch.float32 and fbgemm_available()
    if setting == "auto":
        return ["int8", "float16", "none"] if usable else ["none"]
    if setting != "none" and not usable:
        raise ModelNotFoundError(
            f"QUANTIZATION={setting} needs float32 weights on an x86 CPU with fbgemm (AVX2); this server has "
            f"{dtype} on {device}. Use QUANTIZATION=auto or none."
        )
    return [setting]  # type: ignore[list-item]


def build_decoder(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, setting: str
) -> tuple[Decoder, WeightChoice]:
    """The decoder for `model` in the weight format QUANTIZATION=`setting` asks for (or `auto` chooses)."""
    started = time.perf_counter()
    candidates = _candidates(setting, model.device, model.dtype)
    # the lean forward computes in float32; other dtypes (bfloat16 on AMX, float16 on CUDA) keep transformers'
    lean = fast_llama.supports(model) and model.dtype == torch.float32
    plain = TransformersDecoder(model)

    def float32_decoder() -> Decoder:
        return fast_llama.LlamaDecoder(model) if lean else plain

    if candidates == ["none"]:
        return float32_decoder(), WeightChoice("none", "float32" if setting == "none" else "auto: no fbgemm here")

    config = model.config
    context = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024)
    limit = min(CHECK_TOKENS, context)

    def ids(name: str) -> torch.Tensor:
        return torch.tensor([tokenizer(builtin_text(name))["input_ids"][:limit]], device=model.device)

    absmax = input_absmax(model, ids("calibration.txt"), _linear_layers(model)) if "int8" in candidates else {}
    check = ids("quality_check.txt")
    reference = plain.logits(check)
    for fmt in candidates:
        if fmt == "none":
            return float32_decoder(), WeightChoice(
                "none", "auto: no smaller format passed the quality check", seconds=time.perf_counter() - started
            )
        make = _factory(fmt, absmax)
        restore: Callable[[], None] | None = None
        if lean:
            decoder: Decoder = fast_llama.LlamaDecoder(model, make, embedding_dtype=torch.float16)
        else:
            restore = _swap_linears(model, make)
            decoder = plain
        quality = compare(reference, decoder.logits(check), check)
        if setting != "auto" or quality.passes:
            reason = "auto: the smallest format that passed" if setting == "auto" else f"QUANTIZATION={fmt}"
            return decoder, WeightChoice(fmt, reason, quality, time.perf_counter() - started)
        logger.info("%s weights failed the quality check (%s): trying the next format", fmt, quality)
        if restore is not None:
            restore()
    raise AssertionError("unreachable: `none` ends the candidates")  # pragma: no cover
