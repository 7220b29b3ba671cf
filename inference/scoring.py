"""Log-probabilities the API reports: of each generated token (TGI's `details`, OpenAI's `logprobs`), and of a
prompt's own tokens (OpenAI's `echo` with `logprobs`, which lm-evaluation-harness scores answers with). The prompt's
come from the model's last hidden states a slice of positions at a time, so that a long prompt never holds its whole
[positions x vocabulary] logits at once (2,048 positions of SmolLM2 would be 400 MB)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from inference.client import TokenLogprob

POSITIONS_PER_SLICE = 128


def score_rows(logprobs: torch.Tensor, targets: list[int], top_counts: list[int]) -> list[TokenLogprob]:
    """Per row of `logprobs` ([rows, vocabulary], log-softmaxed): its target token's log-probability and its
    `top_counts[row]` likeliest tokens."""
    chosen = logprobs.gather(1, torch.tensor(targets, device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
    most = max(top_counts, default=0)
    top_values, top_ids = logprobs.topk(most, dim=-1) if most else (logprobs[:, :0], logprobs[:, :0].long())
    return [
        TokenLogprob(value, tuple(zip(top_ids[row, :count].tolist(), top_values[row, :count].tolist(), strict=True)))
        for row, (value, count) in enumerate(zip(chosen, top_counts, strict=True))
    ]


@torch.inference_mode()
def token_logprobs(logits: torch.Tensor, tokens: list[int], wanted: list[int | None]) -> list[TokenLogprob | None]:
    """Each chosen token's log-probability under the model's own distribution (before penalties, temperature and
    truncation, as vLLM reports them) and its row's `wanted[i]` likeliest alternatives; None where `wanted[i]` is."""
    rows = [index for index, want in enumerate(wanted) if want is not None]
    result: list[TokenLogprob | None] = [None] * len(tokens)
    if rows:
        logprobs = logits[rows].float().log_softmax(dim=-1)
        scores = score_rows(logprobs, [tokens[index] for index in rows], [wanted[index] or 0 for index in rows])
        for index, score in zip(rows, scores, strict=True):
            result[index] = score
    return result


@torch.inference_mode()
def prompt_token_logprobs(
    hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor], token_ids: list[int], top_n: int
) -> list[TokenLogprob]:
    """For each prompt token after the first: its log-probability given the ones before it, and the `top_n`
    likeliest tokens there. `hidden` is [positions, hidden size], after the model's final norm."""
    scores: list[TokenLogprob] = []
    for start in range(0, len(token_ids) - 1, POSITIONS_PER_SLICE):
        end = min(start + POSITIONS_PER_SLICE, len(token_ids) - 1)
        # position i's logits predict token i + 1
        logprobs = lm_head(hidden[start:end]).float().log_softmax(dim=-1)
        scores += score_rows(logprobs, token_ids[start + 1 : end + 1], [top_n] * (end - start))
    return scores
