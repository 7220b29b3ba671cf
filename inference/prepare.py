"""`python -m inference.prepare`: fetch or convert MODEL_ID once, ahead of the first start, with visible progress."""

from __future__ import annotations

import logging
import sys

from inference.errors import ModelNotFoundError
from inference.loader import resolve_location
from inference.settings import get_settings


def main() -> int:
    settings = get_settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        source, location = resolve_location(settings)
    except ModelNotFoundError as error:
        print(error.message, file=sys.stderr)
        return 1
    print(f"MODEL_ID={settings.model_id} comes from the {source}: {location}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
