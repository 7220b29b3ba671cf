"""Stand-ins for the bundled model's one-minute conversion, run in separate processes by tests/test_loader.py."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from inference.loader import convert_bundled_model

# Long enough that a second process, started a moment later, finds the first still converting (importing torch and
# transformers takes either process several seconds on a busy machine).
SLOW_S = 10.0


def slow(folder: Path) -> None:
    """Write a complete model folder slowly, recording who converted (one line per conversion) next to it."""
    with (folder.parent / "conversions.log").open("a") as log:
        log.write(f"{os.getpid()}\n")
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    time.sleep(SLOW_S)
    (folder / "config.json").write_text("{}")


def quick(folder: Path) -> None:
    (folder / "config.json").write_text("{}")


def crash(folder: Path) -> None:
    """Die halfway through, as a process killed by the OOM killer or a SIGKILL would."""
    (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":  # python -m tests.fake_conversion TARGET slow|quick|crash
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(convert_bundled_model(Path(sys.argv[1]), convert={"slow": slow, "quick": quick, "crash": crash}[sys.argv[2]]))
