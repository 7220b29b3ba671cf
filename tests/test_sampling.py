"""sample_next_tokens: per-row temperature, top-k, top-p, repetition penalty and seed; rows never affect each other."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from inference.params import SamplingParams
from inference.sampling import RowSampler, apply_repetition_penalty, sample_next_tokens

VOCAB = 64


def row(seed: int | None = 0, prompt: list[int] | None = None, fallback_seed: int = 99, **params: object) -> RowSampler:
    return RowSampler.create(replace(SamplingParams(), seed=seed, **params), prompt or [], fallback_seed)  # type: ignore[arg-type]


def random_logits(rows: int, seed: int, vocab: int = VOCAB, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((rows, vocab), generator=generator) * scale


def draw(rows: list[RowSampler], logits: torch.Tensor) -> list[int]:
    """One sampling step; the logits are cloned because sampling works on them in place."""
    tokens = sample_next_tokens(logits.clone(), rows)
    for sampler, token in zip(rows, tokens, strict=True):
        sampler.record(token)
    return tokens


def test_greedy_rows_take_the_argmax() -> None:
    logits = random_logits(5, seed=1)
    rows = [row(temperature=0.0) for _ in range(5)]
    assert sample_next_tokens(logits.clone(), rows) == logits.argmax(-1).tolist()


def test_greedy_rows_take_the_argmax_next_to_sampled_rows() -> None:
    logits = random_logits(4, seed=2, scale=0.1)  # flat: sampled rows will rarely hit the argmax
    rows = [row(temperature=0.0), row(seed=1, temperature=2.0), row(temperature=0.0), row(seed=2, temperature=2.0)]
    for _ in range(10):
        tokens = sample_next_tokens(logits.clone(), rows)
        assert tokens[0] == logits[0].argmax().item()
        assert tokens[2] == logits[2].argmax().item()


def test_sampling_is_not_greedy() -> None:
    """Guards the tests below: at temperature 1 over flat logits, draws do differ from the argmax."""
    logits = random_logits(1, seed=3, scale=0.5)
    sampler = row(seed=5, temperature=1.0, top_k=0, top_p=1.0)
    tokens = {sample_next_tokens(logits.clone(), [sampler])[0] for _ in range(50)}
    assert len(tokens) > 5


@pytest.mark.parametrize("seed", range(20))
def test_top_k_1_is_the_argmax_even_when_hot(seed: int) -> None:
    logits = random_logits(3, seed=seed, scale=0.2)
    rows = [row(seed=seed, temperature=2.0, top_k=1, top_p=1.0) for _ in range(3)]
    assert sample_next_tokens(logits.clone(), rows) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("seed", range(20))
def test_tiny_top_p_keeps_only_the_top_candidate(seed: int) -> None:
    logits = random_logits(3, seed=seed, scale=0.2)
    rows = [row(seed=seed, temperature=2.0, top_k=0, top_p=1e-6) for _ in range(3)]
    assert sample_next_tokens(logits.clone(), rows) == logits.argmax(-1).tolist()


def test_top_k_limits_the_candidates() -> None:
    logits = random_logits(1, seed=4, scale=0.1)
    allowed = set(logits[0].topk(3).indices.tolist())
    rows = [row(seed=seed, temperature=2.0, top_k=3, top_p=1.0) for seed in range(300)]
    tokens = sample_next_tokens(logits.expand(300, -1).clone(), rows)
    assert set(tokens) == allowed  # all three show up in 300 draws, and nothing else


def test_top_p_keeps_the_smallest_prefix_reaching_the_mass() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs).unsqueeze(0).expand(400, -1).clone()
    rows = [row(seed=seed, temperature=1.0, top_k=0, top_p=0.75) for seed in range(400)]
    tokens = sample_next_tokens(logits, rows)
    assert set(tokens) == {0, 1}  # 0.5 < 0.75 so the second stays; 0.8 >= 0.75 so the third goes
    share = tokens.count(0) / len(tokens)
    assert abs(share - 0.5 / 0.8) < 0.08


def test_draws_follow_the_distribution() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs).unsqueeze(0).expand(3000, -1).clone()
    rows = [row(seed=seed, temperature=1.0, top_k=0, top_p=1.0) for seed in range(3000)]
    tokens = sample_next_tokens(logits, rows)
    for token, expected in enumerate(probs.tolist()):
        assert abs(tokens.count(token) / len(tokens) - expected) < 0.03


def test_temperature_sharpens_and_flattens() -> None:
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = torch.log(probs).unsqueeze(0).expand(2000, -1).clone()
    cold = sample_next_tokens(logits.clone(), [row(seed=s, temperature=0.2, top_k=0, top_p=1.0) for s in range(2000)])
    hot = sample_next_tokens(logits.clone(), [row(seed=s, temperature=2.0, top_k=0, top_p=1.0) for s in range(2000)])
    # p ** (1 / T), renormalised: T=0.2 gives ~0.97 for the top token, T=2 gives ~0.48
    assert cold.count(0) / 2000 > 0.93
    assert 0.40 < hot.count(0) / 2000 < 0.56


def test_same_seed_gives_the_same_tokens() -> None:
    params = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}

    def run(seed: int) -> list[int]:
        sampler = row(seed=seed, **params)
        return [draw([sampler], random_logits(1, seed=step, scale=0.5))[0] for step in range(20)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_without_a_seed_the_fallback_seed_is_used() -> None:
    def run(fallback: int) -> list[int]:
        sampler = row(seed=None, fallback_seed=fallback, temperature=1.0, top_k=0, top_p=1.0)
        return [draw([sampler], random_logits(1, seed=step, scale=0.5))[0] for step in range(20)]

    assert run(1) == run(1)
    assert run(1) != run(2)


ROW_PARAMS = [
    {"seed": 11, "temperature": 1.0, "top_k": 0, "top_p": 0.9},
    {"seed": 12, "temperature": 0.7, "top_k": 5, "top_p": 1.0},
    {"seed": 13, "temperature": 0.0},
    {"seed": 14, "temperature": 1.5, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.3},
    {"seed": None, "fallback_seed": 15, "temperature": 1.2, "top_k": 0, "top_p": 1.0},
    {"seed": 16, "temperature": 0.0, "repetition_penalty": 2.0, "prompt": [1, 2, 3]},
]


def test_a_rows_draws_do_not_depend_on_the_other_rows() -> None:
    steps = [random_logits(len(ROW_PARAMS), seed=100 + step, scale=1.0) for step in range(20)]
    batch = [row(**params) for params in ROW_PARAMS]  # type: ignore[arg-type]
    together = [draw(batch, logits) for logits in steps]
    for index, params in enumerate(ROW_PARAMS):
        alone_row = row(**params)  # type: ignore[arg-type]
        alone = [draw([alone_row], logits[index : index + 1])[0] for logits in steps]
        assert alone == [tokens[index] for tokens in together], params
    # and a row's place in the batch does not matter either
    reordered = [row(**params) for params in reversed(ROW_PARAMS)]  # type: ignore[arg-type]
    flipped = [draw(reordered, logits.flip(0)) for logits in steps]
    assert [tokens[::-1] for tokens in flipped] == together


def test_repetition_penalty_lowers_seen_tokens() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    original = logits.clone()
    apply_repetition_penalty(logits, [row(repetition_penalty=2.0, prompt=[0, 1, 1])])
    assert logits[0, 0] == 1.0  # positive: divided
    assert logits[0, 1] == -4.0  # negative: multiplied (pushed further down), once even if seen twice
    assert torch.equal(logits[0, 2:], original[0, 2:])  # unseen: untouched


def test_repetition_penalty_1_changes_nothing_and_is_per_row() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]])
    apply_repetition_penalty(logits, [row(repetition_penalty=1.0, prompt=[0]), row(repetition_penalty=4.0, prompt=[0])])
    assert logits.tolist() == [[2.0, 1.0, 0.0], [0.5, 1.0, 0.0]]


def test_repetition_penalty_steers_greedy_away_from_generated_tokens() -> None:
    logits = torch.tensor([[3.0, 2.5, 2.2, 1.0]])
    plain = row(temperature=0.0)
    penalised = row(temperature=0.0, repetition_penalty=1.5)
    assert [draw([plain], logits)[0] for _ in range(3)] == [0, 0, 0]
    # 3.0 -> 2.0 once token 0 was produced (2.5 wins), then 2.5 -> 1.67 once token 1 was (2.2 wins)
    assert [draw([penalised], logits)[0] for _ in range(3)] == [0, 1, 2]


def test_record_tracks_tokens_only_when_a_penalty_needs_them() -> None:
    sampler = row(prompt=[4, 5], repetition_penalty=1.0)
    sampler.record(9)
    assert sampler.seen_tokens.tolist() == [4, 5]
    sampler = row(prompt=[4, 5], repetition_penalty=1.2)
    sampler.record(9)
    assert sampler.seen_tokens.tolist() == [4, 5, 9]


def test_low_temperature_sampling_is_stable_on_peaked_logits() -> None:
    logits = torch.tensor([[50.0, 0.0, -50.0, float("-inf")]])
    sampler = row(temperature=0.01, top_k=0, top_p=1.0)
    tokens = [sample_next_tokens(logits.clone(), [sampler])[0] for _ in range(20)]
    assert tokens == [0] * 20


def test_logits_made_under_inference_mode_can_be_penalised() -> None:
    """The model runs under torch.inference_mode(), so its logits are inference tensors; the in-place penalty must
    still work on them (it used to raise "Inplace update to inference tensor outside InferenceMode")."""
    with torch.inference_mode():
        greedy_logits = torch.tensor([[3.0, 2.5, 2.0, 1.0]])
        sampled_logits = torch.tensor([[3.0, 2.5, 2.0, 1.0]])
    assert sample_next_tokens(greedy_logits, [row(temperature=0.0, repetition_penalty=2.0, prompt=[0])]) == [1]
    sampled_row = row(seed=1, temperature=1.0, top_k=1, repetition_penalty=2.0, prompt=[0])
    assert sample_next_tokens(sampled_logits, [sampled_row]) == [1]
