"""The running batch and its slot cache, below the engine: prefill without padding, rows that grow on demand."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from inference.batch import RunningBatch, prefill
from inference.loader import LoadedModel, load_model
from inference.settings import Settings

SettingsFactory = Callable[..., Settings]


@pytest.fixture(scope="module")
def loaded(tiny_llama_dir: Path, make_settings: SettingsFactory) -> LoadedModel:
    return load_model(make_settings(tiny_llama_dir))


def test_prefill_takes_only_prompts_of_one_length(loaded: LoadedModel) -> None:
    with pytest.raises(ValueError, match="one length"):
        prefill(loaded.decoder, [[5, 6, 7], [5, 6]])


def test_a_row_prefilled_with_others_of_its_length_gets_its_own_logits(loaded: LoadedModel) -> None:
    _, alone = prefill(loaded.decoder, [[5, 6, 7, 8]])
    prefilled, together = prefill(loaded.decoder, [[9, 10, 11, 12], [5, 6, 7, 8]])
    torch.testing.assert_close(together[1], alone[0], rtol=1e-4, atol=1e-4)  # another row: off by units
    assert prefilled.next_positions.tolist() == [[4], [4]]


def test_cache_rows_grow_with_the_batch_and_stop_at_its_limit(loaded: LoadedModel) -> None:
    batch = RunningBatch(max_rows=12)
    capacities = []
    for length in range(1, 13):  # one newcomer at a time, each a different width
        prefilled, logits = prefill(loaded.decoder, [list(range(5, 5 + length))])
        batch.add(prefilled, logits.argmax(-1, keepdim=True))
        assert batch.cache is not None
        capacities.append(batch.cache.row_capacity)
        assert batch.size <= batch.cache.row_capacity <= 12
    # allocated as rows arrive (a quarter more at a time), not all 12 rows up front
    assert capacities[:4] == [1, 2, 3, 4]
    assert capacities[-1] == 12
    # every row still decodes: one step gives one row of logits per sequence
    assert batch.step(loaded.decoder).shape[0] == 12


def test_leaving_rows_keep_the_capacity_for_the_next_newcomers(loaded: LoadedModel) -> None:
    batch = RunningBatch(max_rows=8)
    prefilled, logits = prefill(loaded.decoder, [[5, 6, 7]] * 6)
    batch.add(prefilled, logits.argmax(-1, keepdim=True))
    assert batch.cache is not None
    capacity = batch.cache.row_capacity
    batch.remove([0, 2, 4])
    prefilled, logits = prefill(loaded.decoder, [[8, 9]] * 3)
    batch.add(prefilled, logits.argmax(-1, keepdim=True))
    assert batch.size == 6
    assert batch.cache.row_capacity == capacity
