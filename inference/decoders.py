"""How the engine runs the model: its forward pass (transformers' own, or the lean Llama one) and its weight format.

`build_decoder` turns a loaded transformers model into a `Decoder` and decides QUANTIZATION: with `auto` on a CPU it
tries the smallest formats first (int4 where our integer kernels build, then int8, then float16) and keeps the first
that passes the quality check against float32 on a built-in text (quantization.QualityCheck), so quality is checked
on the machine and model it serves. The check's verdicts (and int8's calibration) are kept in MODEL_CACHE_DIR, keyed
by the model's weights, so only the first start pays for them (`python -m inference.prepare` does it ahead of time).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from inference import fast_llama, integer_kernels
from inference.client import TokenLogprob
from inference.errors import ModelNotFoundError
from inference.kv_cache import SlotCache
from inference.prefix_cache import CachedPrefix, prefill_start
from inference.quantization import (
    Q8Linear,
    QualityCheck,
    QuantizedFormat,
    compare,
    fbgemm_available,
    input_absmax,
    int4_available,
    kernel_fits,
    make_linear,
)
from inference.scoring import prompt_token_logprobs

if TYPE_CHECKING:  # importing it imports transformers' modeling code (~1.5 s, ~120 MB), which a saved decoder skips
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

WeightFormat = Literal["none", "float16", "int8", "int4"]
# Tokens of the built-in texts used at most (calibration and the quality check each take one forward pass).
CHECK_TOKENS = 512
# Bump when the quality check or how a format is built changes, so verdicts cached by an older version are redone.
CHECK_VERSION = "4"


class Decoder(Protocol):
    """What the engine asks of the model: prefill prompts of one length, decode one token per running row."""

    # the dtype decode wants the running batch's keys and values in; None keeps the prefill's
    cache_dtype: torch.dtype | None

    def prefill(
        self, prompts: list[list[int]], prefix: CachedPrefix | None = None
    ) -> tuple[DynamicCache, torch.Tensor]:
        """A fresh cache holding the prompts, and the logits after each prompt's last token. With `prefix`, an
        opening every prompt starts with, only the tokens after it are computed."""
        ...

    def decode(
        self, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """Feed each row's newest token ([rows, 1]) at its position; the logits of the token after it."""
        ...

    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Every position's logits for one sequence [1, n] (the quality check's perplexity)."""
        ...

    def prompt_logprobs(self, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
        """Each token after the first: its log-probability given those before it, and the top_n alternatives."""
        ...


class TransformersDecoder:
    """transformers' own forward: works for every causal LM the slot cache supports."""

    cache_dtype: torch.dtype | None = None

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model

    @torch.inference_mode()
    def prefill(
        self, prompts: list[list[int]], prefix: CachedPrefix | None = None
    ) -> tuple[DynamicCache, torch.Tensor]:
        device = self.model.device
        skip, cache, rest = prefill_start(prefix, prompts)
        width = len(prompts[0])
        output = self.model(
            input_ids=torch.tensor(rest, dtype=torch.long, device=device),
            attention_mask=torch.ones((len(prompts), width), dtype=torch.long, device=device),
            position_ids=torch.arange(skip, width, device=device).expand(len(prompts), -1),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return output.cache, output.logits[:, -1, :]

    @torch.inference_mode()
    def decode(
        self, cache: SlotCache, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        device = self.model.device
        output = self.model(
            input_ids=tokens.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=positions.to(device),
            cache=cache,
            use_cache=True,
        )
        logits: torch.Tensor = output.logits[:, -1, :]
        return logits

    @torch.inference_mode()
    def logits(self, token_ids: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(input_ids=token_ids.to(self.model.device)).logits
        return logits

    @torch.inference_mode()
    def prompt_logprobs(self, token_ids: list[int], top_n: int) -> list[TokenLogprob]:
        # the base model's last hidden state is after its final norm (LlamaModel, GPT2Model alike)
        input_ids = torch.tensor([token_ids], device=self.model.device)
        hidden = self.model.base_model(input_ids=input_ids).last_hidden_state[0]
        head = self.model.get_output_embeddings()  # type: ignore[no-untyped-call]
        return prompt_token_logprobs(hidden, head, token_ids, top_n)


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
        if name != "lm_head":
            return make_linear(fmt, weight, bias, absmax.get(name))
        # the LM head is the layer most sensitive to rounding (its error lands straight on the logits), and the
        # bundled SmolLM2's is 8-bit (Q8_0), which int4 would coarsen: with int4 it stays in 8-bit groups on our
        # kernel (exact for SmolLM2), else float16
        if fmt == "int4" and integer_kernels.load() is None and kernel_fits(weight, bias):
            return Q8Linear(weight)
        return make_linear("float16", weight, bias, None)

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


def int4_kernel_in_use() -> str:
    """Which kernel multiplies int4 weights here, for /model-info and the log."""
    why_not = integer_kernels.load()
    if why_not is None:
        return "our AVX2 kernel, 16-bit activations; the LM head in 8-bit groups (Q8_0)"
    return f"torch's kernel, bfloat16 activations (ours is not used: {why_not})"


def _verdict_key(fmt: WeightFormat) -> str:
    """The two int4 kernels round activations differently, so each has its own verdict."""
    return f"{fmt} (torch's kernel)" if fmt == "int4" and integer_kernels.load() is not None else fmt


def _candidates(setting: str, device: torch.device, dtype: torch.dtype) -> list[WeightFormat]:
    """The formats to try, best first; an explicit one that can't run here is a configuration error."""
    usable = device.type == "cpu" and dtype == torch.float32 and fbgemm_available()
    if setting == "auto":
        # smallest first; int4 only on our own kernel, which is faster than float16 at every batch size measured
        # (torch's is slower from ~12 rows up, prefills included: docs/benchmarks.md)
        smallest: list[WeightFormat] = ["int4"] if integer_kernels.load() is None else []
        return [*smallest, "int8", "float16", "none"] if usable else ["none"]
    if setting == "int4" and integer_kernels.load() is not None and not int4_available():
        raise ModelNotFoundError(
            f"QUANTIZATION=int4 needs our int4 kernel, but {integer_kernels.load()}, or torch's, which needs torch 2.5 "
            f"or later (this is {torch.__version__})."
        )
    if setting != "none" and not usable:
        raise ModelNotFoundError(
            f"QUANTIZATION={setting} needs float32 weights on an x86 CPU with fbgemm (AVX2); this server has "
            f"{dtype} on {device}. Use QUANTIZATION=auto or none."
        )
    return [setting]  # type: ignore[list-item]


class CheckCache:
    """Quality verdicts and int8 calibration for one model's weights, kept in a folder across starts.

    Keyed by a fingerprint of the weights (a sample of every tensor), the config, the check texts, torch's version
    and CHECK_VERSION, so any change there measures again. Writes are atomic (rename); a cache that can't be read or
    written only costs the measurement."""

    def __init__(self, folder: Path, model: PreTrainedModel) -> None:
        self.folder = folder
        self.key = _fingerprint(model)
        self.verdicts: dict[str, QualityCheck] = {}
        try:
            stored = json.loads(self._path(".json").read_text())
            self.verdicts = {fmt: QualityCheck(**values) for fmt, values in stored["verdicts"].items()}
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("Ignoring the unreadable quality-check cache %s: %s", self._path(".json"), error)

    def _path(self, suffix: str) -> Path:
        return self.folder / f"{self.key}{suffix}"

    def record(self, fmt: str, quality: QualityCheck) -> None:
        self.verdicts[fmt] = quality
        data = json.dumps({"verdicts": {k: asdict(v) for k, v in self.verdicts.items()}}).encode()
        self._write(".json", lambda path: path.write_bytes(data), "the quality check")

    def absmax(self) -> dict[str, torch.Tensor] | None:
        try:
            stored: dict[str, torch.Tensor] = torch.load(self._path("-absmax.pt"), weights_only=True)
            return stored
        except FileNotFoundError:
            return None
        except (OSError, RuntimeError, ValueError) as error:
            logger.warning("Ignoring the unreadable calibration cache %s: %s", self._path("-absmax.pt"), error)
            return None

    def record_absmax(self, absmax: dict[str, torch.Tensor]) -> None:
        self._write("-absmax.pt", lambda path: torch.save(absmax, path), "the int8 calibration")

    def _write(self, suffix: str, write: Callable[[Path], object], what: str) -> None:
        """Write through a temporary file renamed into place, so a reader never sees half a file."""
        temporary = self._path(f"{suffix}.{time.time_ns()}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write(temporary)
            temporary.replace(self._path(suffix))
        except OSError as error:
            logger.warning("Could not cache %s in %s: %s", what, self.folder, error)
            temporary.unlink(missing_ok=True)


def _fingerprint(model: PreTrainedModel) -> str:
    digest = hashlib.sha256(f"{CHECK_VERSION} torch {torch.__version__}".encode())
    digest.update(model.config.to_json_string().encode())
    for name in ("calibration.txt", "quality_check.txt"):
        digest.update(builtin_text(name).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            # every 4099th value of every tensor: any retrained or re-quantized model differs somewhere in it
            digest.update(name.encode())
            digest.update(tensor.detach().flatten()[::4099].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


class _Measurements:
    """What the checks need from float32, computed the first time it is asked for (a cached verdict needs none)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plain: TransformersDecoder) -> None:
        self.model, self.tokenizer, self.plain = model, tokenizer, plain
        config = model.config
        context = int(getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 1024)
        self.limit = min(CHECK_TOKENS, context)

    def ids(self, name: str) -> torch.Tensor:
        ids = self.tokenizer(builtin_text(name))["input_ids"][: self.limit]
        return torch.tensor([ids], device=self.model.device)

    @functools.cached_property
    def check_ids(self) -> torch.Tensor:
        return self.ids("quality_check.txt")

    @functools.cached_property
    def reference(self) -> torch.Tensor:
        return self.plain.logits(self.check_ids)

    @functools.cached_property
    def absmax(self) -> dict[str, torch.Tensor]:
        return input_absmax(self.model, self.ids("calibration.txt"), _linear_layers(self.model))


def build_decoder(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    setting: str,
    checks: Path | None = None,
    lean_forward: bool = True,
) -> tuple[Decoder, WeightChoice]:
    """The decoder for `model` in the weight format QUANTIZATION=`setting` asks for (or `auto` chooses); `checks`
    is the folder that keeps quality verdicts between starts (None: measure every time); `lean_forward` False keeps
    transformers' forward for every model (LEAN_FORWARD)."""
    started = time.perf_counter()
    candidates = _candidates(setting, model.device, model.dtype)
    # the lean forward computes in float32; other dtypes (bfloat16 on AMX, float16 on CUDA) keep transformers'
    lean = lean_forward and fast_llama.supports(model) and model.dtype == torch.float32
    plain = TransformersDecoder(model)

    def float32_decoder() -> Decoder:
        return fast_llama.LlamaDecoder(model) if lean else plain

    if candidates == ["none"]:
        return float32_decoder(), WeightChoice("none", "float32" if setting == "none" else "auto: no fbgemm here")

    cache = CheckCache(checks, model) if checks is not None else None
    measured = _Measurements(model, tokenizer, plain)
    for fmt in candidates:
        if fmt == "none":
            return float32_decoder(), WeightChoice(
                "none", "auto: no smaller format passed the quality check", seconds=time.perf_counter() - started
            )
        known = cache.verdicts.get(_verdict_key(fmt)) if cache is not None else None
        if setting == "auto" and known is not None and not known.passes:
            logger.info("%s weights failed the quality check at an earlier start (%s): skipping them", fmt, known)
            continue
        absmax: dict[str, torch.Tensor] = {}
        if fmt == "int8":
            cached_absmax = cache.absmax() if cache is not None else None
            absmax = measured.absmax if cached_absmax is None else cached_absmax
            if cache is not None and cached_absmax is None:
                cache.record_absmax(absmax)
        make = _factory(fmt, absmax)
        restore: Callable[[], None] | None = None
        if lean:
            # the formats that round already (float32 keeps transformers' numbers) decode with our attention kernel,
            # over a float16 KV cache, where it builds
            decoder: Decoder = fast_llama.LlamaDecoder(
                model, make, embedding_dtype=torch.float16, attention_kernel=integer_kernels.load() is None
            )
        else:
            restore = _swap_linears(model, make)
            decoder = plain
        quality = known or compare(measured.reference, decoder.logits(measured.check_ids), measured.check_ids)
        if cache is not None and known is None:
            cache.record(_verdict_key(fmt), quality)
        if setting != "auto" or quality.passes:
            reason = "auto: the smallest format that passed" if setting == "auto" else f"QUANTIZATION={fmt}"
            if fmt == "int4":
                reason += f"; {int4_kernel_in_use()}"
            if known is not None:
                reason += " (quality as measured at an earlier start)"
            return decoder, WeightChoice(fmt, reason, quality, time.perf_counter() - started)
        logger.info("%s weights failed the quality check (%s): trying the next format", fmt, quality)
        if restore is not None:
            restore()
    raise AssertionError("unreachable: `none` ends the candidates")  # pragma: no cover
