"""The fuzz pass of tests/test_reliability.py at full size: thousands of hostile requests over every route (REST,
OpenAI, and the Gradio API over raw HTTP), from outside, against a live server.

    .venv/bin/python bench/fuzz.py                      # a tiny chat model served in-process, ~1,500 cases
    .venv/bin/python bench/fuzz.py --url http://127.0.0.1:7860 --cases-per-target 60

Passes when no request got a 5xx, every error had the one shape (and Gradio's were written for people), the server
was healthy after, and (in-process) nothing logged or printed a traceback. Exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.settings import Settings
from tests.fuzzing import run_fuzz
from tests.live_server import serve
from tests.tiny_models import build_tiny_model


class Tee(io.TextIOBase):
    """stderr as it was, and a copy to search for tracebacks (Gradio prints its own with traceback.print_exc)."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream, self.copy = stream, io.StringIO()

    def write(self, text: str) -> int:
        self.copy.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


class TracebackCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.exc_info is not None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="fuzz this server instead of one started here on a tiny model")
    parser.add_argument("--cases-per-target", type=int, default=120, help="hostile requests per route (default 120)")
    parser.add_argument("--seed", type=int, default=12)
    options = parser.parse_args()
    tracebacks = TracebackCounter()
    logging.getLogger().addHandler(tracebacks)
    logging.getLogger().setLevel(logging.INFO)
    stderr = Tee(sys.stderr)  # type: ignore[arg-type]
    with ExitStack() as stack:
        url = options.url
        if url is None:
            folder = build_tiny_model(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "tiny", "llama")
            settings = Settings(
                model_id=str(folder),
                torch_threads=1,
                dtype="float32",
                max_new_tokens=16,
                max_input_tokens=64,
                model_cache_dir=Path(tempfile.gettempdir()) / "llm-serving-fuzz",
            )
            url = stack.enter_context(serve(settings)).url
        sys.stderr = stderr  # type: ignore[assignment]
        started = time.perf_counter()
        report = run_fuzz(url, options.cases_per_target, options.seed)
        sys.stderr = stderr.stream  # type: ignore[assignment]
    printed = stderr.copy.getvalue().count("Traceback")
    print(f"fuzz: {report.summary()} in {time.perf_counter() - started:.0f} s")
    if options.url is None:
        print(f"tracebacks: {printed} printed, {tracebacks.count} logged")
    for failure in report.failures[:20]:
        print("FAILED:", failure)
    return 1 if report.failures or printed or tracebacks.count else 0


if __name__ == "__main__":
    sys.exit(main())
