"""Quantized linear layers: close to float32, and a row's numbers independent of the other rows of its batch."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from inference import decoders, fast_llama, integer_kernels
from inference.quantization import (
    INT4_GROUP,
    Float16Linear,
    Int4Linear,
    Int8Linear,
    Q4Linear,
    Q8Linear,
    Q8Rows,
    QualityCheck,
    compare,
    fbgemm_available,
    input_absmax,
    int4_available,
    int4_groups,
    int8_groups,
    make_linear,
    perplexity,
)
from tests.test_fast_llama import decode_groups

pytestmark = pytest.mark.skipif(not fbgemm_available(), reason="fbgemm needs an x86 CPU with AVX2")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((actual - expected).norm(dim=-1) / expected.norm(dim=-1)).max())


def one_at_a_time(layer: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """Each row through `layer` alone, stacked: what a batch of them must give bit for bit."""
    return torch.cat([layer(rows[i : i + 1]) for i in range(len(rows))])


def rounded_to_16_bits(rows: torch.Tensor) -> torch.Tensor:
    """Rows as our kernels round them: one scale per row, its largest |value| onto 32767."""
    scale = rows.abs().amax(dim=1, keepdim=True) / 32767
    return (rows / scale).round() * scale


@pytest.fixture
def weight() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(96, 64) * 0.05


@pytest.fixture
def rows() -> torch.Tensor:
    """16 rows whose magnitudes differ 100-fold: a per-tensor activation scale would crush the small ones."""
    torch.manual_seed(1)
    return torch.randn(16, 64) * torch.logspace(-1, 1, 16).unsqueeze(1)


def test_int8_is_close_to_float32(weight: torch.Tensor, rows: torch.Tensor) -> None:
    assert relative_error(Int8Linear(weight, None, None)(rows), rows @ weight.T) < 0.05


def test_int8_rows_are_the_same_alone_and_batched(weight: torch.Tensor, rows: torch.Tensor) -> None:
    layer = Int8Linear(weight, None, None)
    alone = one_at_a_time(layer, rows)
    assert torch.equal(alone, layer(rows))  # bit for bit, whatever the neighbours


def test_int8_adds_the_bias_unscaled(weight: torch.Tensor, rows: torch.Tensor) -> None:
    bias = torch.linspace(-3, 3, 96)
    with_bias = Int8Linear(weight, bias, None)(rows)
    without = Int8Linear(weight, None, None)(rows)
    torch.testing.assert_close(with_bias - without, bias.expand_as(with_bias), rtol=0, atol=1e-5)


def test_int8_keeps_leading_dimensions(weight: torch.Tensor) -> None:
    assert Int8Linear(weight, None, None)(torch.randn(2, 3, 64)).shape == (2, 3, 96)


def test_smoothing_tames_an_outlier_channel(weight: torch.Tensor, rows: torch.Tensor) -> None:
    """One input channel 100x larger than the rest and read by small weights, as in LLMs: with per-row scales it
    leaves the other channels a few levels each; SmoothQuant moves part of its range into the weights."""
    rows, weight = rows.clone(), weight.clone()
    rows[:, 7] *= 100
    weight[:, 7] /= 100
    expected = rows @ weight.T
    plain = relative_error(Int8Linear(weight, None, None)(rows), expected)
    smoothed = relative_error(Int8Linear(weight, None, rows.abs().amax(0))(rows), expected)
    assert smoothed < plain / 2


def test_float16_weights_compute_in_float32(weight: torch.Tensor, rows: torch.Tensor) -> None:
    half_weight = weight.half().float()  # what float16 storage can hold: then only float32 rounding differs
    torch.testing.assert_close(Float16Linear(weight, None)(rows), rows @ half_weight.T, rtol=1e-5, atol=1e-5)


# ----- int4 -----------------------------------------------------------------------------------------------------------

needs_int4 = pytest.mark.skipif(not int4_available(), reason="torch's CPU int4 matmul needs torch 2.5 or later")


def q4_1_weight(out_features: int = 96, in_features: int = 64) -> torch.Tensor:
    """Weights as GGUF's Q4_1 stores them (the bundled SmolLM2's layers): in each group of 32 inputs, 16 evenly
    spaced levels from the group's own low end, every level used at both ends."""
    torch.manual_seed(2)
    groups = in_features // INT4_GROUP
    levels = torch.randint(0, 16, (out_features, groups, INT4_GROUP)).float()
    levels[..., 0], levels[..., 1] = 0, 15
    # GGUF stores each group's scale and low end in float16
    scale = (torch.rand(out_features, groups, 1) * 0.01 + 0.001).half().float()
    low = (-torch.rand(out_features, groups, 1) * 0.1).half().float()
    return (levels * scale + low).reshape(out_features, in_features)


@needs_int4
def test_int4_recovers_q4_1_weights(rows: torch.Tensor) -> None:
    """Multiplying by the identity reads the weights back: within bfloat16 rounding of them, far inside the half
    step (3% of a group's range) that rounding arbitrary weights to 16 levels costs."""
    weight = q4_1_weight()
    read_back = Int4Linear(weight, None)(torch.eye(64)).T
    assert (read_back - weight).abs().max() < 0.005 * (weight.max() - weight.min())
    assert relative_error(Int4Linear(weight, None)(rows), rows @ weight.T) < 0.01


@needs_int4
def test_int4_is_close_to_float32_for_any_weights(weight: torch.Tensor, rows: torch.Tensor) -> None:
    assert relative_error(Int4Linear(weight, None)(rows), rows @ weight.T) < 0.15  # 16 levels a group: coarse


@needs_int4
def test_int4_rows_are_the_same_alone_and_batched(rows: torch.Tensor) -> None:
    layer = Int4Linear(q4_1_weight(), None)
    alone = one_at_a_time(layer, rows)
    assert torch.equal(alone, layer(rows))


@needs_int4
def test_int4_adds_the_bias_and_keeps_leading_dimensions(rows: torch.Tensor) -> None:
    weight, bias = q4_1_weight(), torch.linspace(-3, 3, 96)
    torch.testing.assert_close(
        Int4Linear(weight, bias)(rows) - Int4Linear(weight, None)(rows), bias.expand(16, 96), rtol=0, atol=1e-5
    )
    assert Int4Linear(weight, None)(torch.randn(2, 3, 64)).shape == (2, 3, 96)


def test_our_integer_kernels_build_and_load_here() -> None:
    """CI's machine has g++ and an AVX2 CPU, so the int4 kernel must build there (a failed build falls back to torch's
    kernel, which would hide a broken kernel source behind a slower server)."""
    if not integer_kernels.cpu_has_avx2():
        pytest.skip("the kernel needs AVX2")
    assert integer_kernels.load() is None


def test_our_q4_1_kernel_multiplies_16_bit_rows_by_the_weights_exactly(own_kernels: None) -> None:
    """Against the same arithmetic in float64: rows rounded to 16 bits with one scale each, times the weights from
    their levels and float16 scales and low ends (GGUF keeps them in float16)."""
    torch.manual_seed(3)
    # 12 vectors of 8 outputs (3 full tiles of 4), then a last tile of 1, 2 and 3 vectors
    for out_features, in_features in [(96, 64), (40, 64), (48, 32), (56, 64), (960, 576), (576, 1536)]:
        weight = q4_1_weight(out_features, in_features)
        rows = torch.randn(5, in_features) * torch.logspace(-2, 2, in_features)  # outliers, as activations have
        levels, group_scale, low = int4_groups(weight)
        stored = (levels * group_scale.half().double() + low.half().double()).reshape(weight.shape)
        expected = rounded_to_16_bits(rows).double() @ stored.T
        actual = Q4Linear(weight)(rows).double()
        assert float((actual - expected).abs().max() / expected.abs().max()) < 2e-5  # float32 sums of the groups


def test_our_q4_1_kernel_keeps_the_likeliest_token_where_bfloat16_activations_may_not(own_kernels: None) -> None:
    """Rows rounded to 16 bits stay within 1e-4 of float32's result; torch's kernel rounds rows to bfloat16."""
    torch.manual_seed(4)
    weight, rows = q4_1_weight(576, 576), torch.randn(8, 576)
    exact = rows.double() @ weight.double().T
    ours = relative_error(Q4Linear(weight)(rows).double(), exact)
    assert ours < 1e-4
    if int4_available():
        assert ours < relative_error(Int4Linear(weight, None)(rows).double(), exact) / 10


def test_our_q4_1_kernel_gives_a_row_the_same_bits_alone_and_in_any_batch(own_kernels: None) -> None:
    """Rows are blocked in pairs and outputs in tiles of 32 split across threads: no row's numbers may change."""
    torch.manual_seed(5)
    layer = Q4Linear(q4_1_weight(3072, 576))
    rows = torch.randn(17, 576)
    alone = one_at_a_time(layer, rows)
    for size in (2, 3, 16, 17):
        assert torch.equal(layer(rows[:size]), alone[:size])
    assert torch.equal(layer(rows[5:12]), alone[5:12])


def test_our_q4_1_layer_runs_as_torchscript_and_keeps_shapes(own_kernels: None, rows: torch.Tensor) -> None:
    layer = Q4Linear(q4_1_weight())
    assert torch.equal(torch.jit.script(layer)(rows), layer(rows))
    assert layer(torch.randn(2, 3, 64)).shape == (2, 3, 96)
    assert torch.equal(layer(torch.zeros(1, 64)), torch.zeros(1, 96))  # an all-zero row has no scale to divide by


def q8_0_weight(out_features: int = 96, in_features: int = 64) -> torch.Tensor:
    """Weights as GGUF's Q8_0 stores them (the bundled SmolLM2's LM head): levels -127..127 times a float16 scale
    per group of 32 inputs, the largest |level| of each group 127."""
    torch.manual_seed(6)
    groups = in_features // INT4_GROUP
    levels = torch.randint(-127, 128, (out_features, groups, INT4_GROUP)).float()
    levels[..., 0] = 127
    scale = (torch.rand(out_features, groups, 1) * 0.001 + 0.0001).half().float()
    return (levels * scale).reshape(out_features, in_features)


def test_q8_0_weights_are_recovered_exactly() -> None:
    weight = q8_0_weight()
    levels, scale = int8_groups(weight)
    assert torch.equal((levels.reshape(96, -1, INT4_GROUP) * scale).reshape(96, 64), weight)


def test_our_q8_0_kernel_multiplies_16_bit_rows_by_the_weights_exactly(own_kernels: None) -> None:
    torch.manual_seed(7)
    for out_features, in_features in [(96, 64), (49152 // 64, 576)]:
        weight = q8_0_weight(out_features, in_features)
        rows = torch.randn(5, in_features) * torch.logspace(-2, 2, in_features)
        expected = rounded_to_16_bits(rows).double() @ weight.double().T
        actual = Q8Linear(weight)(rows).double()
        assert float((actual - expected).abs().max() / expected.abs().max()) < 2e-5  # float32 sums of the groups


def test_our_q8_0_kernel_gives_a_row_the_same_bits_alone_and_in_any_batch(own_kernels: None) -> None:
    torch.manual_seed(8)
    layer = torch.jit.script(Q8Linear(q8_0_weight(200, 576)))
    rows = torch.randn(9, 576)
    alone = one_at_a_time(layer, rows)
    for size in (2, 3, 9):
        assert torch.equal(layer(rows[:size]), alone[:size])
    assert torch.equal(layer(rows[4:7]), alone[4:7])


@pytest.mark.parametrize("compiled", [True, False], ids=["torchscript", "eager"])
def test_q8_rows_are_the_weights_rows_read_from_the_packed_head_without_a_copy(compiled: bool) -> None:
    weight = q8_0_weight(200, 576)
    head = Q8Linear(weight)
    rows = Q8Rows(head)
    assert rows.packed.untyped_storage().data_ptr() == head.packed.untyped_storage().data_ptr()
    read = torch.jit.script(rows) if compiled else rows
    indices = torch.tensor([[0, 7, 8, 199], [100, 3, 3, 57]])  # every lane, both ends, a repeat
    assert torch.equal(read(indices), weight[indices])  # exact: GGUF's Q8_0 values
    assert torch.equal(read(indices[1]), weight[indices[1]])


def test_a_tied_8_bit_head_serves_as_the_embedding_table(own_kernels: None, tiny_llama_dir: Path) -> None:
    """A tied model's int4 decoder reads its embeddings from the 8-bit LM head (one table instead of two) and
    decodes the same bits as with a separate table holding the head's 8-bit values."""
    tied = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tied.lm_head.weight = tied.model.embed_tokens.weight  # as SmolLM2's are
    assert fast_llama.lm_head_is_embedding(tied)
    make = decoders._factory("int4", {})
    shared = fast_llama.LlamaDecoder(tied, make)
    assert cast(Any, shared.step).embed.original_name == "Q8Rows"

    untied = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    untied.lm_head.weight = nn.Parameter(untied.model.embed_tokens.weight.detach().clone())
    levels, scale = int8_groups(untied.lm_head.weight)
    table = (levels.float().reshape(levels.shape[0], -1, INT4_GROUP) * scale.half().float()).reshape(levels.shape)
    untied.model.embed_tokens.weight = nn.Parameter(table)
    assert not fast_llama.lm_head_is_embedding(untied)
    separate = fast_llama.LlamaDecoder(untied, make)
    assert cast(Any, separate.step).embed.original_name == "TableEmbedding"

    groups = [[[5, 6, 7]], [[30, 31, 32, 33, 34]], [[12, 13, 14, 15, 16]]]
    for first, second in zip(decode_groups(shared, groups, 5), decode_groups(separate, groups, 5), strict=True):
        assert torch.equal(first, second)


@needs_int4
def test_int4_layers_go_to_the_kernel_that_can_take_them(own_kernels: None) -> None:
    assert isinstance(make_linear("int4", torch.randn(96, 64), None, None), Q4Linear)
    assert isinstance(make_linear("int4", torch.randn(40, 64), None, None), Q4Linear)  # outputs 8k
    assert isinstance(make_linear("int4", torch.randn(96, 64), torch.randn(96), None), Int4Linear)  # a bias: torch's
    assert isinstance(make_linear("int4", torch.randn(36, 64), None, None), Float16Linear)  # outputs not 8k
    assert isinstance(make_linear("int4", torch.randn(96, 48), None, None), Float16Linear)  # inputs not 32k


@needs_int4
def test_without_our_kernel_int4_runs_on_torchs(monkeypatch: pytest.MonkeyPatch) -> None:
    """No compiler (or a failed build): int4 still serves, on torch's kernel, and says so."""
    monkeypatch.setattr(integer_kernels, "load", lambda: "our kernels could not be built here (no g++)")
    assert isinstance(make_linear("int4", torch.randn(96, 64), None, None), Int4Linear)
    assert "torch's kernel" in decoders.int4_kernel_in_use()
    assert "no g++" in decoders.int4_kernel_in_use()


def test_a_build_killed_half_way_does_not_block_or_break_the_next_start(tmp_path: Path) -> None:
    """A start killed while building leaves torch's lock file (which would make every later start wait forever) and
    maybe a half-written library: the next start builds again and loads the kernels."""
    if not integer_kernels.cpu_has_avx2():
        pytest.skip("the kernels need AVX2")
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}

    def python(code: str, **env: str) -> str:
        script = f"from inference import integer_kernels\n{code}"
        done = subprocess.run(
            [sys.executable, "-c", script],
            env={**environment, **env},
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        )
        return done.stdout.strip()

    folder = Path(python("print(integer_kernels.build_folder())"))
    assert folder.parent == tmp_path
    (folder / "lock").touch()
    (folder / f"{integer_kernels.NAME}.so").write_bytes(b"not a library: the linker was killed")
    assert python("print(integer_kernels.load())") == "None"
    # the next start loads that build: no compiler or ninja needed (none on its PATH)
    loaded = python("import torch; print(integer_kernels.load(), torch.ops.llm_serving.q8_0_linear)", PATH="/none")
    assert loaded.startswith("None llm_serving.q8_0_linear"), loaded


def test_a_failed_build_is_reported_not_raised(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch.utils.cpp_extension

    def failing_build(**kwargs: object) -> None:
        raise RuntimeError("Error building extension 'llm_serving_integer_linear'\ng++: not found")

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(torch.utils.cpp_extension, "load", failing_build)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    integer_kernels.load.cache_clear()
    try:
        expected = "our kernels could not be built here (Error building extension 'llm_serving_integer_linear')"
        assert integer_kernels.load() == expected
    finally:
        integer_kernels.load.cache_clear()
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    integer_kernels.load.cache_clear()
    try:
        assert integer_kernels.load() == "this CPU has no AVX2 (torch reports DEFAULT)"
    finally:
        integer_kernels.load.cache_clear()


@needs_int4
def test_int4_runs_as_torchscript(rows: torch.Tensor) -> None:
    layer = Int4Linear(q4_1_weight(), None)
    assert torch.equal(torch.jit.script(layer)(rows), layer(rows))


def test_input_absmax_records_each_channels_largest_value() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    inputs = torch.tensor([[1.0, -5.0, 2.0, 0.0], [-3.0, 1.0, 0.5, 0.25]])
    seen = input_absmax(model, inputs, ["0"])
    assert seen["0"].tolist() == [3.0, 5.0, 2.0, 0.25]


def test_perplexity_is_exp_of_the_mean_negative_log_likelihood() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]]))
    ids = torch.tensor([[0, 1, 0]])
    expected = math.exp(-(math.log(0.5) + math.log(0.25)) / 2)
    assert perplexity(logits, ids) == pytest.approx(expected)


def test_the_quality_check_compares_perplexity_and_the_likeliest_tokens() -> None:
    torch.manual_seed(2)
    reference = torch.randn(1, 50, 10)
    ids = reference.argmax(-1)  # a text the reference finds likely
    flipped = reference.clone()
    flipped[0, :5] = -flipped[0, :5]  # 5 of 50 positions now prefer another token
    same = compare(reference, reference.clone(), ids)
    assert same.perplexity == same.perplexity_float32
    assert same.top1_agreement == 1.0
    assert same.passes
    worse = compare(reference, flipped, ids)
    assert worse.top1_agreement == 0.9
    assert worse.perplexity > worse.perplexity_float32
    assert not worse.passes


@pytest.mark.parametrize(
    ("perplexity_now", "agreement", "passes"), [(10.29, 0.99, True), (10.31, 0.99, False), (10.0, 0.979, False)]
)
def test_the_gate_is_3_percent_perplexity_and_98_percent_agreement(
    perplexity_now: float, agreement: float, passes: bool
) -> None:
    assert QualityCheck(10.0, perplexity_now, agreement).passes is passes


# ----- the quality verdicts kept between starts ----------------------------------------------------------------------


@pytest.fixture
def tiny_llama(tiny_llama_dir: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_llama_dir)


def forbid_measuring(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("measured although the verdict was cached")

    monkeypatch.setattr(decoders, "compare", fail)
    monkeypatch.setattr(decoders, "input_absmax", fail)


def test_a_second_start_reuses_the_quality_verdicts(
    tiny_llama: tuple[PreTrainedModel, PreTrainedTokenizerBase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny_llama
    _, first = decoders.build_decoder(model, tokenizer, "auto", tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 1
    forbid_measuring(monkeypatch)
    decoder, second = decoders.build_decoder(model, tokenizer, "auto", tmp_path)
    assert (second.format, second.quality) == (first.format, first.quality)
    assert second.reason.endswith("(quality as measured at an earlier start)")
    if second.format == "int8":  # its calibration came from the cache too
        assert decoder.logits(torch.tensor([[3, 4, 5]])).shape[-1] == model.config.vocab_size


def test_a_format_that_failed_before_is_not_built_again(
    tiny_llama: tuple[PreTrainedModel, PreTrainedTokenizerBase], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny_llama
    cache = decoders.CheckCache(tmp_path, model)
    cache.record("int4", QualityCheck(10.0, 10.1, 0.9))
    cache.record("int8", QualityCheck(10.0, 20.0, 0.5))
    cache.record("float16", QualityCheck(10.0, 10.0, 1.0))
    forbid_measuring(monkeypatch)
    monkeypatch.setattr(
        decoders,
        "make_linear",
        lambda fmt, *args: pytest.fail(f"built {fmt}") if fmt != "float16" else Float16Linear(*args[:2]),
    )
    _, choice = decoders.build_decoder(model, tokenizer, "auto", tmp_path)
    assert choice.format == "float16"


def test_other_weights_are_measured_afresh(
    tiny_llama: tuple[PreTrainedModel, PreTrainedTokenizerBase], tmp_path: Path
) -> None:
    model = tiny_llama[0]
    decoders.CheckCache(tmp_path, model).record("int8", QualityCheck(10.0, 20.0, 0.5))
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    assert decoders.CheckCache(tmp_path, model).verdicts == {}


def test_an_unreadable_cache_only_costs_the_measurement(
    tiny_llama: tuple[PreTrainedModel, PreTrainedTokenizerBase], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, tokenizer = tiny_llama
    cache = decoders.CheckCache(tmp_path, model)
    (tmp_path / f"{cache.key}.json").write_text("{not json")
    _, choice = decoders.build_decoder(model, tokenizer, "auto", tmp_path)
    assert choice.quality is not None
    assert "unreadable quality-check cache" in caplog.text
    assert decoders.CheckCache(tmp_path, model).verdicts  # rewritten


def test_lean_forward_false_keeps_transformers_forward_with_the_same_numbers(
    tiny_llama: tuple[PreTrainedModel, PreTrainedTokenizerBase],
) -> None:
    model, tokenizer = tiny_llama
    lean, _ = decoders.build_decoder(model, tokenizer, "none")
    plain, choice = decoders.build_decoder(model, tokenizer, "none", lean_forward=False)
    assert isinstance(lean, fast_llama.LlamaDecoder)
    assert isinstance(plain, decoders.TransformersDecoder)
    assert choice.format == "none"
    token_ids = torch.tensor([[3, 4, 5, 6, 7]])
    torch.testing.assert_close(plain.logits(token_ids), lean.logits(token_ids), rtol=1e-4, atol=1e-4)
