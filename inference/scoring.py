"""Log-probabilities of a prompt's own tokens (OpenAI's `echo` with `logprobs`, which lm-evaluation-harness scores
answers with), from the model's last hidden states, a slice of positions at a time so that a long prompt never holds
its whole [positions x vocabulary] logits at once (2,048 positions of SmolLM2 would be 400 MB)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from inference.client import TokenLogprob

POSITIONS_PER_SLICE = 128


@torch.inference_mode()
def prompt_token_logprobs(
    hidden: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor], token_ids: list[int], top_n: int
) -> list[TokenLogprob]:
    """For each prompt token after the first: its log-probability given the ones before it, and the `top_n`
    likeliest tokens there. `hidden` is [positions, hidden size], after the model's final norm."""
    targets = torch.tensor(token_ids[1:], device=hidden.device)
    scores: list[TokenLogprob] = []
    for start in range(0, len(token_ids) - 1, POSITIONS_PER_SLICE):
        end = min(start + POSITIONS_PER_SLICE, len(token_ids) - 1)
        # position i's logits predict token i + 1
        logprobs = lm_head(hidden[start:end]).float().log_softmax(dim=-1)
        chosen = logprobs.gather(1, targets[start:end].unsqueeze(1)).squeeze(1).tolist()
        top_values, top_ids = logprobs.topk(top_n, dim=-1) if top_n else (logprobs[:, :0], logprobs[:, :0].long())
        for row, value in enumerate(chosen):
            top = tuple(zip(top_ids[row].tolist(), top_values[row].tolist(), strict=True))
            scores.append(TokenLogprob(value, top))
    return scores
