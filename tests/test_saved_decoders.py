"""A decoder built at one start is saved in MODEL_CACHE_DIR and read back at the next, computing the same bits."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from inference.fast_llama import LlamaDecoder
from inference.loader import LoadedModel, load_model
from inference.quantization import fbgemm_available
from tests.conftest import SettingsFactory
from tests.test_fast_llama import decode_groups

GROUPS = [[[5, 6, 7]], [[30, 31, 32, 33, 34, 35, 36], [40, 41, 42, 43, 44, 45, 46]], [[12, 13, 14, 15, 16]]]
EARLIER = "built at an earlier start"


@pytest.fixture
def llama_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A model folder of the test's own (a test may change its files)."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "tiny-llama"))


@pytest.fixture
def tied_llama(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """The tiny Llama with its LM head tied to its embeddings, as SmolLM2's is (int4 then reads the embeddings from
    the 8-bit head: another tensor layout to save and read back)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.config.tie_word_embeddings = True
    folder = tmp_path / "tiny-llama"
    model.save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(folder)
    return folder


def saved_folders(cache: Path) -> list[Path]:
    return sorted((cache / "decoders").glob("tiny-llama-*"))


def load_refusing_weights(settings: object, monkeypatch: pytest.MonkeyPatch) -> LoadedModel:
    """load_model, failing the test if it reads the model's weights with transformers."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a saved decoder was there: the weights should not be loaded")

    with monkeypatch.context() as patch:
        patch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
        return load_model(settings)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("quantization", "model"),
    [
        *[(quantization, "llama_copy") for quantization in ("none", "float16", "int8", "int4")],
        *[(quantization, "tied_llama") for quantization in ("none", "int4")],
    ],
)
def test_a_second_start_reads_the_saved_decoder_and_decodes_the_same_bits(
    quantization: str,
    model: str,
    tmp_path: Path,
    make_settings: SettingsFactory,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if quantization == "int4":
        request.getfixturevalue("own_kernels")
    if quantization == "int8" and not fbgemm_available():
        pytest.skip("int8 layers need fbgemm (an x86 CPU with AVX2)")
    folder = request.getfixturevalue(model)
    settings = make_settings(folder, model_cache_dir=tmp_path / "cache", save_built_decoder=True)
    settings = settings.model_copy(update={"quantization": quantization})
    built = load_model(settings)
    assert EARLIER not in built.weights.reason
    assert len(saved_folders(tmp_path / "cache")) == 1

    restored = load_refusing_weights(settings, monkeypatch)

    assert isinstance(restored.decoder, LlamaDecoder)
    assert restored.weights.format == built.weights.format == quantization
    assert restored.weights.reason.startswith(built.weights.reason)
    assert restored.weights.reason.endswith(EARLIER)
    assert restored.decoder.cache_dtype == built.decoder.cache_dtype
    assert restored.parameters == built.parameters
    assert restored.config.to_dict() == built.config.to_dict()
    assert restored.generation_config.to_dict() == built.generation_config.to_dict()
    assert restored.tokenizer.pad_token == built.tokenizer.pad_token
    # prefill, a padded batch's decode steps, and the whole-text logits: the same bits
    for step, (first, second) in enumerate(
        zip(decode_groups(built.decoder, GROUPS, 6), decode_groups(restored.decoder, GROUPS, 6), strict=True)
    ):
        assert torch.equal(first, second), f"step {step} differs"
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    assert torch.equal(built.decoder.logits(ids), restored.decoder.logits(ids))
    assert built.decoder.prompt_logprobs([5, 6, 7, 8], 2) == restored.decoder.prompt_logprobs([5, 6, 7, 8], 2)


def test_a_changed_model_or_setting_builds_afresh_and_replaces_the_older_save(
    llama_copy: Path, tmp_path: Path, make_settings: SettingsFactory
) -> None:
    cache = tmp_path / "cache"
    settings = make_settings(llama_copy, model_cache_dir=cache, save_built_decoder=True)
    load_model(settings)
    (before,) = saved_folders(cache)
    config = llama_copy / "config.json"
    stat = config.stat()
    os.utime(config, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # the model folder changed

    assert EARLIER not in load_model(settings).weights.reason
    (after,) = saved_folders(cache)  # the older save is gone
    assert after != before
    assert EARLIER in load_model(settings).weights.reason
    # another setting that shapes the decoder has a save of its own
    assert EARLIER not in load_model(settings.model_copy(update={"quantization": "float16"})).weights.reason
    assert len(saved_folders(cache)) == 2


def test_an_unreadable_save_is_built_again_and_replaced(
    llama_copy: Path, tmp_path: Path, make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "cache"
    settings = make_settings(llama_copy, model_cache_dir=cache, save_built_decoder=True)
    built = load_model(settings)
    (folder,) = saved_folders(cache)
    (folder / "step.pt").write_bytes(b"not TorchScript")

    with caplog.at_level(logging.WARNING, logger="inference.saved_decoders"):
        rebuilt = load_model(settings)
    assert EARLIER not in rebuilt.weights.reason
    assert "Ignoring the unreadable saved decoder" in caplog.text
    restored = load_model(settings)
    assert EARLIER in restored.weights.reason
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.equal(built.decoder.logits(ids), restored.decoder.logits(ids))


def test_a_cache_that_cannot_be_written_only_costs_the_next_start(
    llama_copy: Path, tmp_path: Path, make_settings: SettingsFactory, caplog: pytest.LogCaptureFixture
) -> None:
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    settings = make_settings(llama_copy, model_cache_dir=not_a_folder, save_built_decoder=True)
    with caplog.at_level(logging.WARNING, logger="inference.saved_decoders"):
        loaded = load_model(settings)
        again = load_model(settings)
    assert isinstance(loaded.decoder, LlamaDecoder)
    assert "Could not save the built decoder" in caplog.text
    assert EARLIER not in again.weights.reason


def test_two_model_folders_of_one_name_keep_a_save_each(
    llama_copy: Path, tmp_path: Path, make_settings: SettingsFactory
) -> None:
    twin = Path(shutil.copytree(llama_copy, tmp_path / "elsewhere" / llama_copy.name))
    cache = tmp_path / "cache"
    for folder in (llama_copy, twin, llama_copy, twin):
        load_model(make_settings(folder, model_cache_dir=cache, save_built_decoder=True))
    assert len(saved_folders(cache)) == 2
    for folder in (llama_copy, twin):
        settings = make_settings(folder, model_cache_dir=cache, save_built_decoder=True)
        assert EARLIER in load_model(settings).weights.reason


def test_turned_off_nothing_is_saved(llama_copy: Path, tmp_path: Path, make_settings: SettingsFactory) -> None:
    settings = make_settings(llama_copy, model_cache_dir=tmp_path / "cache", save_built_decoder=False)
    load_model(settings)
    assert EARLIER not in load_model(settings).weights.reason
    assert saved_folders(tmp_path / "cache") == []


def test_a_start_from_a_saved_decoder_never_imports_transformers_modeling_code(
    llama_copy: Path, tmp_path: Path, make_settings: SettingsFactory
) -> None:
    """What makes it fast: transformers' modeling code alone takes ~1.5 s and ~120 MB to import (docs)."""
    cache = tmp_path / "cache"
    load_model(make_settings(llama_copy, model_cache_dir=cache, save_built_decoder=True))
    script = (
        "import sys\n"
        "from inference.loader import load_model\n"
        "from inference.settings import Settings\n"
        f"loaded = load_model(Settings(model_id={str(llama_copy)!r}, model_cache_dir={str(cache)!r}, "
        "quantization='none', torch_threads=1))\n"
        "print(loaded.weights.reason)\n"
        "print('transformers.modeling_utils' in sys.modules)\n"
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env=environment,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    reason, imported = result.stdout.strip().splitlines()[-2:]
    assert reason.endswith(EARLIER)
    assert imported == "False"
