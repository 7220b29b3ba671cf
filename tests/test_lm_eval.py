"""lm-evaluation-harness end to end against a live server, as its README tells users to run it: `local-completions`
with token-id prompts, a multiple-choice task (scored by `echo` + `logprobs`) and a generation task, each on a small
dataset written here (no hub). Its log-likelihoods must equal transformers' own forward pass."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.live_server import LiveServer, serve

lm_eval = pytest.importorskip("lm_eval", reason="pip install -r requirements-dev.txt")

QUESTIONS = [
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " seven"], "answer": 0},
    {"question": "Fish live in", "choices": [" water", " trees", " clouds", " cars"], "answer": 0},
]
TASKS = {
    "tiny_choice": {
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{answer}}",
        "metric_list": [{"metric": "acc"}],
    },
    "tiny_generate": {
        "output_type": "generate_until",
        "doc_to_text": "{{question}}",
        "doc_to_target": "{{choices[answer]}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    },
}


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, make_settings: Any) -> Iterator[LiveServer]:
    with serve(make_settings(tiny_llama_dir)) as live:
        yield live


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two task configs over one JSON-lines file (JSON is YAML, so the configs are written as JSON)."""
    folder = tmp_path_factory.mktemp("lm-eval-tasks")
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(question) + "\n" for question in QUESTIONS))
    for name, config in TASKS.items():
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}}}
        (folder / f"{name}.yaml").write_text(json.dumps({**task, "test_split": "test", **config}))
    return folder


def loglikelihood(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """The continuation's log-likelihood given the context, split into tokens as lm-evaluation-harness does."""
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logprobs = model(torch.tensor([whole])).logits[0].float().log_softmax(-1)
    return sum(float(logprobs[position - 1, whole[position]]) for position in range(len(context_ids), len(whole)))


def test_lm_eval_scores_and_generates_through_the_completions_route(
    server: LiveServer, task_folder: Path, tiny_llama_dir: Path
) -> None:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model_args = {
        "model": "tiny",
        "base_url": f"{server.url}/v1/completions",
        "tokenizer": str(tiny_llama_dir),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,
        "num_concurrent": 2,
        "max_retries": 1,
    }
    results = simple_evaluate(
        model="local-completions",
        model_args=model_args,
        tasks=list(TASKS),
        task_manager=TaskManager(include_path=str(task_folder)),
        log_samples=True,
    )
    assert results is not None
    assert set(results["results"]) == set(TASKS)
    assert 0.0 <= results["results"]["tiny_choice"]["acc,none"] <= 1.0
    # every answer's log-likelihood equals transformers' forward pass over the same tokens
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    scored = 0
    for sample in results["samples"]["tiny_choice"]:
        for (context, continuation), response in zip(sample["arguments"], sample["resps"], strict=True):
            served, _is_greedy = response[0]
            assert abs(served - loglikelihood(model, tokenizer, context, continuation)) < 1e-4
            scored += 1
    assert scored == sum(len(question["choices"]) for question in QUESTIONS)
    generated = [sample["resps"][0][0] for sample in results["samples"]["tiny_generate"]]
    assert len(generated) == len(QUESTIONS)
    assert all(isinstance(text, str) for text in generated)
