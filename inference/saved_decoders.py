"""Built decoders kept on disk (MODEL_CACHE_DIR/decoders), so later starts skip building them.

Building the lean decoder was most of a start's model time on 2 vCPUs: importing transformers' modeling code
(~1.5 s, ~120 MB that stay resident), its `from_pretrained` (~0.8 s), packing the weights for our kernels (~0.5 s)
and compiling the step with TorchScript (~0.9 s), all holding the GIL the web layer's start-up needs too. The built
step is one TorchScript module that holds its (packed) weights: `torch.jit.save` writes it once, and a later start
reads it back with `torch.jit.load` in ~0.1 s, without the transformers model.

A saved decoder is used only when everything that shaped it is unchanged: the model folder's files (names, sizes,
modification times), the settings that pick the format, torch's and transformers' versions, the source of the modules
that build and check it, and whether our kernels load. Anything else builds afresh and replaces it. Writes are atomic
(a folder renamed into place); one that can't be read is rebuilt, one that can't be written only costs the next start
its time. Only local folders (the bundled SmolLM2 included) on the CPU are saved: a hub id's files are resolved by
transformers itself. torch.jit.load runs the saved TorchScript, so MODEL_CACHE_DIR is trusted as the model folder is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
import transformers

from inference import integer_kernels
from inference.decoders import WeightChoice
from inference.fast_llama import LlamaDecoder, torchscript_warnings_silenced
from inference.quantization import QualityCheck

logger = logging.getLogger(__name__)

# Bump when what is saved changes shape, so older saves are not read.
SAVED_VERSION = "1"
PACKAGE = Path(__file__).parent
# The code that builds a decoder or chooses its format: any change to it builds afresh.
SHAPING_SOURCES = (
    [
        PACKAGE / name
        for name in ("fast_llama.py", "quantization.py", "decoders.py", "integer_kernels.py", "saved_decoders.py")
    ]
    + integer_kernels.SOURCES
    + integer_kernels.HEADERS
    + sorted((PACKAGE / "data").glob("*.txt"))
)
STEP_FILE = "step.pt"
FACTS_FILE = "facts.json"


class SavedDecoder:
    """The saved decoder of one model folder under one set of choices: `load` it if saved, else `save` it once built.

    `choices` are what decides the decoder besides the model's files (the QUANTIZATION and LEAN_FORWARD settings)."""

    def __init__(self, cache_dir: Path, model_folder: Path, choices: dict[str, object]) -> None:
        self.root = cache_dir / "decoders"
        # one folder per model folder and choices (two folders of one name don't replace each other's saves); the
        # key's tail changes whenever anything that shaped it does
        where = hashlib.sha256(str(model_folder.resolve()).encode()).hexdigest()[:8]
        self.prefix = f"{model_folder.name}-{where}-" + "".join(f"{value}-" for value in choices.values())
        self.folder = self.root / f"{self.prefix}{_key(model_folder, choices)}"

    def load(self) -> tuple[LlamaDecoder, WeightChoice, int] | None:
        """The decoder, its weight choice and the model's parameter count, or None when none is saved (or it can't
        be read: then it is built again)."""
        if not (self.folder / FACTS_FILE).exists():
            return None
        started = time.perf_counter()
        try:
            facts = json.loads((self.folder / FACTS_FILE).read_text())
            with torchscript_warnings_silenced():
                step = torch.jit.load(str(self.folder / STEP_FILE), map_location="cpu")  # type: ignore[no-untyped-call]
            cache_dtype = getattr(torch, facts["cache_dtype"]) if facts["cache_dtype"] else None
            quality = QualityCheck(**facts["quality"]) if facts["quality"] else None
            reason, parameters = facts["reason"] + "; built at an earlier start", int(facts["parameters"])
            decoder = LlamaDecoder.from_step(step, cache_dtype)
            # one token through the whole model: a save that reads back but can't run is rebuilt, not served
            decoder.logits(torch.zeros(1, 1, dtype=torch.long))
            weights = WeightChoice(facts["format"], reason, quality, time.perf_counter() - started)
        except (OSError, RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
            logger.warning("Ignoring the unreadable saved decoder %s (building it again): %s", self.folder, error)
            shutil.rmtree(self.folder, ignore_errors=True)  # so that the rebuilt one can take its place
            return None
        return decoder, weights, parameters

    def save(self, decoder: object, weights: WeightChoice, parameters: int) -> bool:
        """Keep `decoder` for later starts if it is a compiled lean decoder (others are rebuilt each start); True if
        it was written. Older saves for the same model and choices are removed."""
        if not isinstance(decoder, LlamaDecoder) or not isinstance(decoder.step, torch.jit.ScriptModule):
            return False
        started = time.perf_counter()
        facts = {
            "format": weights.format,
            "reason": weights.reason,
            "quality": asdict(weights.quality) if weights.quality else None,
            "parameters": parameters,
            "cache_dtype": str(decoder.cache_dtype).removeprefix("torch.") if decoder.cache_dtype else None,
        }
        work: Path | None = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            work = Path(tempfile.mkdtemp(prefix=f".{self.folder.name}.", dir=self.root))
            with torchscript_warnings_silenced():
                torch.jit.save(decoder.step, str(work / STEP_FILE))
            (work / FACTS_FILE).write_text(json.dumps(facts))  # last: its presence marks a complete save
            work.rename(self.folder)
        except OSError as error:
            if not (self.folder / FACTS_FILE).exists():  # else another process saved the same meanwhile
                logger.warning("Could not save the built decoder in %s: %s", self.root, error)
            return False
        finally:
            if work is not None:
                shutil.rmtree(work, ignore_errors=True)
        for older in self.root.glob(f"{self.prefix}*"):
            if older != self.folder:
                shutil.rmtree(older, ignore_errors=True)
        seconds = time.perf_counter() - started
        logger.info("Saved the built decoder in %s (%.1f s) for later starts", self.folder, seconds)
        return True


def _key(model_folder: Path, choices: dict[str, object]) -> str:
    versions = f"{SAVED_VERSION} torch {torch.__version__} transformers {transformers.__version__}"
    digest = hashlib.sha256(versions.encode())
    digest.update(json.dumps(choices, sort_keys=True).encode())
    if choices.get("quantization") != "none":  # float32 never uses our kernels: don't build them just for the key
        # int4 and the attention kernel exist only where our kernels load (ATEN_CPU_CAPABILITY can hide AVX2)
        digest.update(f"our kernels: {integer_kernels.load()}".encode())
    for path in SHAPING_SOURCES:
        digest.update(path.read_bytes())
    for path in sorted(model_folder.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
