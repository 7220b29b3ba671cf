"""Exercise a running server end to end: every REST route and named Gradio endpoint, plus a few bad inputs.

    python client_test.py --url http://127.0.0.1:7860

Prints one line per check and exits non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
from collections.abc import Callable
from typing import Any

import httpx
from gradio_client import Client


class Checks:
    def __init__(self) -> None:
        self.failures = 0
        self.count = 0

    def run(self, name: str, check: Callable[[], str]) -> None:
        self.count += 1
        try:
            detail = check()
        except Exception as error:  # a failed check must not stop the others
            self.failures += 1
            print(f"FAIL {name}: {type(error).__name__}: {error}")
        else:
            print(f"ok   {name}: {detail}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def expect_error(response: httpx.Response, status: int) -> str:
    expect(response.status_code == status, f"expected {status}, got {response.status_code}: {response.text[:200]}")
    error = response.json()["error"]
    expect({"message", "type", "param", "code"} <= set(error), f"error shape is {error}")
    return f"{status} {error['message'][:90]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:7860")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    url = args.url.rstrip("/")
    http = httpx.Client(base_url=url, timeout=args.timeout)
    checks = Checks()

    def post(body: Any, **kwargs: Any) -> httpx.Response:
        return http.post("/generate", json=body, **kwargs)

    def health() -> str:
        response = http.get("/health")
        expect(response.status_code == 200, f"status {response.status_code}: {response.text}")
        expect(response.json()["status"] == "ok", response.text)
        return response.text

    def model_info() -> str:
        info = http.get("/model-info").json()
        for key in ("model_id", "source", "architecture", "parameters", "dtype", "device", "context_length", "limits"):
            expect(key in info, f"missing {key}")
        return f"{info['model_id']} from {info['source']}, {info['parameters']:,} parameters on {info['device']}"

    def generate() -> str:
        body = post({"prompt": "The capital of France is", "max_new_tokens": 12, "temperature": 0}).json()
        expect(body["finish_reason"] in ("length", "stop", "eos"), str(body))
        expect(body["usage"]["completion_tokens"] >= 1, str(body))
        return repr(body["generated_text"])

    def seed() -> str:
        request = {"prompt": "Once upon a time", "max_length": 16, "temperature": 1.0, "seed": 1234}
        first, second = post(request).json(), post(request).json()
        expect(first["generated_text"] == second["generated_text"], "same seed gave different text")
        return "same seed, same text"

    def stop() -> str:
        body = post({"prompt": "Count: 1, 2, 3,", "max_new_tokens": 32, "temperature": 0, "stop": [","]}).json()
        expect("," not in body["generated_text"], str(body))
        expect(body["finish_reason"] in ("stop", "eos", "length"), str(body))
        return f"{body['finish_reason']}: {body['generated_text']!r}"

    def bad_inputs() -> str:
        results = [
            expect_error(post({"prompt": ""}), 422),
            expect_error(post({"prompt": "hi", "temperature": -1}), 422),
            expect_error(post({"prompt": "hi", "top_p": "high"}), 422),
            expect_error(
                http.post("/generate", content=b"{not json", headers={"content-type": "application/json"}), 422
            ),
            expect_error(post({"prompt": "word " * 5_000}), 422),  # over MAX_INPUT_TOKENS
            expect_error(post({"prompt": "word " * 250_000}), 413),  # over MAX_BODY_BYTES
        ]
        return "; ".join(result.split(" ", 1)[0] for result in results)

    def probes_and_metrics() -> str:
        expect(http.get("/health/live").status_code == 200, "live")
        expect(http.get("/health/ready").status_code == 200, "ready")
        metrics = http.get("/metrics").text
        expect("llm_requests_running" in metrics and "llm_generation_tokens_total" in metrics, "metrics names")
        return "live, ready, /metrics"

    def tokenize() -> str:
        body = http.post("/tokenize", json={"messages": [{"role": "user", "content": "Hello there"}]}).json()
        expect(body["count"] == len(body["tokens"]) == len(body["pieces"]) > 0, str(body)[:200])
        return f"{body['count']} tokens"

    def stream() -> str:
        events = []
        request = {"prompt": "Once upon a time", "max_new_tokens": 12, "stream": True, "temperature": 0}
        with http.stream("POST", "/generate", json=request) as response:
            expect(response.headers["content-type"].startswith("text/event-stream"), response.headers["content-type"])
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
        expect(events[-1]["type"] == "done", str(events[-1]))
        joined = "".join(event["text"] for event in events[:-1])
        expect(joined == events[-1]["generated_text"], f"{joined!r} != {events[-1]['generated_text']!r}")
        return f"{len(events) - 1} text events, then done"

    def openai_routes() -> str:
        model = http.get("/v1/models").json()["data"][0]["id"]
        chat = http.post(
            "/v1/chat/completions",
            json={"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8},
        ).json()
        expect(chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"], str(chat)[:200])
        completion = http.post("/v1/completions", json={"model": model, "prompt": "The sky", "max_tokens": 6}).json()
        expect(completion["object"] == "text_completion", str(completion)[:200])
        # the one model serves any name (unless STRICT_MODEL_NAME), and says which model answered
        other = http.post("/v1/completions", json={"model": "gpt-nothing", "prompt": "x", "max_tokens": 2}).json()
        expect(other.get("model") == model, str(other)[:200])
        expect_error(http.get("/v1/models/gpt-nothing"), 404)
        return f"models, chat ({chat['usage']['completion_tokens']} tokens), completions, any name served, card 404"

    def gradio_generate() -> str:
        client = Client(url + "/", verbose=False)
        text = client.predict("The sky is", 12, 0.0, 0.95, 50, api_name="/generate")
        expect(isinstance(text, str) and len(text) > 0, repr(text))
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(client.predict, f"Fact {i}:", 8, 0.0, 0.95, 50, api_name="/generate") for i in range(4)
            ]
            texts = [future.result() for future in futures]
        expect(all(isinstance(t, str) and t for t in texts), repr(texts))
        return f"{text!r} and 4 concurrent calls"

    def gradio_chat() -> str:
        client = Client(url + "/", verbose=False)
        job = client.submit("Say hello.", [], "", 0.0, 0.95, 50, 24, api_name="/chat")
        partials = list(job)
        final = job.result()
        expect(isinstance(final, str) and final, repr(final))
        return f"{len(partials)} streamed updates, final {final!r}"

    def gradio_bad_input() -> str:
        client = Client(url + "/", verbose=False)
        try:
            client.predict("hi", 12, 9.0, 0.95, 50, api_name="/generate")
        except Exception as error:
            return f"refused: {error}"
        raise AssertionError("temperature 9 was accepted")

    for name, check in [
        ("GET /health", health),
        ("GET /model-info", model_info),
        ("POST /generate", generate),
        ("POST /generate seed", seed),
        ("POST /generate stop", stop),
        ("POST /generate bad inputs", bad_inputs),
        ("POST /generate stream", stream),
        ("POST /tokenize", tokenize),
        ("probes and /metrics", probes_and_metrics),
        ("OpenAI routes", openai_routes),
        ("gradio /generate", gradio_generate),
        ("gradio /chat (streaming)", gradio_chat),
        ("gradio /generate bad input", gradio_bad_input),
    ]:
        checks.run(name, check)
    print(f"{checks.count - checks.failures} passed, {checks.failures} failed")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
