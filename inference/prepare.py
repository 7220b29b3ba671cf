"""`python -m inference.prepare`: fetch or convert MODEL_ID once, ahead of the first start, with visible progress;
then load it as the server would, so the weight format's quality check (QUANTIZATION) is measured and cached, and the
built decoder saved (SAVE_BUILT_DECODER), too."""

from __future__ import annotations

import logging
import sys

from inference.errors import ModelNotFoundError
from inference.loader import load_model
from inference.settings import get_settings


def main() -> int:
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        loaded = load_model(settings)  # converts or fetches MODEL_ID first, with its progress in the log
    except ModelNotFoundError as error:
        print(error.message, file=sys.stderr)
        return 1
    print(f"MODEL_ID={settings.model_id} comes from the {loaded.source}: {loaded.location}")
    print(f"Weights served as {loaded.weights.format} ({loaded.weights.reason}); later starts reuse this check", end="")
    print(" and the built decoder." if settings.save_built_decoder else ".")
    return 0


if __name__ == "__main__":
    sys.exit(main())
