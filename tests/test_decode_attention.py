"""Our decode attention kernel (inference/kernels/decode_attention.cpp): torch's attention's numbers, every row over
its own columns only, so a row decodes the same bits alone and in any padded batch, over a float16 KV cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from inference import integer_kernels
from inference.fast_llama import LlamaDecoder
from inference.quantization import Int8Linear, fbgemm_available
from tests.test_fast_llama import assert_groups_decode_as_alone, decode_groups

pytestmark = pytest.mark.usefixtures("own_kernels")


def reference(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, starts: list[int], end: int
) -> torch.Tensor:
    """Softmax attention of each row over its columns starts[row]..end, in float64."""
    rows = []
    for row, start in enumerate(starts):
        own_keys, own_values = keys[row, :, start:end].double(), values[row, :, start:end].double()
        scores = torch.matmul(query[row].double(), own_keys.transpose(1, 2)).softmax(-1)
        rows.append(torch.matmul(scores, own_values).reshape(-1))
    return torch.stack(rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_size", [16, 64, 72, 128])
def test_each_row_attends_over_its_own_columns(dtype: torch.dtype, head_size: int) -> None:
    torch.manual_seed(head_size)
    rows, kv_heads, groups, capacity = 5, 3, 3, 40
    query = torch.randn(rows, kv_heads, groups, head_size)
    keys = torch.randn(rows + 2, kv_heads, capacity, head_size).to(dtype)  # spare rows and columns, as the cache has
    values = torch.randn(rows + 2, kv_heads, capacity, head_size).to(dtype)
    starts, end = [0, 3, 17, 29, 30], 31  # the last row has one column: its own new key
    attended = torch.ops.llm_serving.decode_attention(query, keys, values, torch.tensor(starts), end)
    assert attended.shape == (rows, kv_heads * groups * head_size)
    assert attended.dtype == torch.float32
    torch.testing.assert_close(attended.double(), reference(query, keys, values, starts, end), rtol=1e-5, atol=1e-5)


def test_a_row_gets_the_same_bits_alone_and_in_a_batch() -> None:
    torch.manual_seed(1)
    query = torch.randn(6, 2, 4, 64)
    keys, values = torch.randn(8, 2, 50, 64).half(), torch.randn(8, 2, 50, 64).half()
    starts = torch.tensor([0, 11, 11, 30, 2, 47])
    together = torch.ops.llm_serving.decode_attention(query, keys, values, starts, 48)
    for row in range(6):
        alone = torch.ops.llm_serving.decode_attention(
            query[row : row + 1], keys[row : row + 1], values[row : row + 1], starts[row : row + 1], 48
        )
        assert torch.equal(alone[0], together[row]), f"row {row}"


@pytest.mark.parametrize(
    ("starts", "end", "message"),
    [([0, 5], 5, "start must be before end"), ([0, -1], 5, "start must be before end"), ([0, 0], 41, "outside")],
)
def test_bad_arguments_raise_instead_of_reading_outside_the_buffers(starts: list[int], end: int, message: str) -> None:
    keys = torch.zeros(2, 1, 40, 16)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.llm_serving.decode_attention(torch.zeros(2, 1, 1, 16), keys, keys, torch.tensor(starts), end)


def attention_kind(decoder: LlamaDecoder) -> str:
    attention = decoder.layers[0].attention
    return str(getattr(attention, "original_name", type(attention).__name__))  # scripted: the class's name there


@pytest.fixture(scope="module")
def llama(tiny_llama_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.mark.skipif(not fbgemm_available(), reason="int8 layers need fbgemm (an x86 CPU with AVX2)")
@pytest.mark.parametrize("compiled", [True, False], ids=["torchscript", "eager"])
def test_with_the_kernel_a_row_decodes_bit_for_bit_alone_and_in_a_padded_batch(
    llama: PreTrainedModel, compiled: bool
) -> None:
    decoder = LlamaDecoder(
        llama, lambda weight, bias, name: Int8Linear(weight, bias, None), compiled=compiled, attention_kernel=True
    )
    assert attention_kind(decoder) == "KernelAttention"
    assert decoder.cache_dtype == torch.float16
    groups = [[[5, 6, 7], [8, 9, 10]], [[30, 31, 32, 33, 34, 35, 36]], [[12, 13, 14, 15, 16], [40, 41, 42, 43, 44]]]
    assert_groups_decode_as_alone(decoder, groups)


def test_the_kernel_over_a_float16_cache_decodes_what_torchs_attention_does_in_float32(llama: PreTrainedModel) -> None:
    groups = [[[5, 6, 7]], [[30, 31, 32, 33, 34, 35, 36]], [[12, 13, 14, 15, 16], [40, 41, 42, 43, 44]]]
    with_kernel = decode_groups(LlamaDecoder(llama, attention_kernel=True), groups, steps=6)
    with_torch = decode_groups(LlamaDecoder(llama), groups, steps=6)
    for kernel_logits, torch_logits in zip(with_kernel, with_torch, strict=True):
        # float16 keeps 11 bits of each key and value: the logits move by under 1% of their spread (attending over a
        # row's padding, or another row's keys, moves them by about their spread)
        torch.testing.assert_close(kernel_logits, torch_logits, rtol=0, atol=1e-2 * float(torch_logits.std()))


def test_without_our_kernels_the_decoder_keeps_torchs_attention_and_float32(
    llama: PreTrainedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(integer_kernels, "load", lambda: "our kernels could not be built here (no g++)")
    decoder = LlamaDecoder(llama, attention_kernel=True)
    assert decoder.cache_dtype is None
    assert attention_kind(decoder) == "RunsAttention"
