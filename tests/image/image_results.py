"""What the image test measured (image size, build, start-up and stop times, peak memory): printed
at the end of the pytest run (conftest.py) and saved as JSON next to the image build's logs."""

from __future__ import annotations

import json
import os
from typing import Any

RESULTS: dict[str, Any] = {}
SAVED = "/var/lib/podnet/image/measurements.json"


def save() -> None:
    if not RESULTS:
        return
    try:
        os.makedirs(os.path.dirname(SAVED), exist_ok=True)
        with open(SAVED, "w", encoding="utf-8") as f:
            json.dump(RESULTS, f, indent=1, sort_keys=True)
    except OSError:
        pass


def lines() -> list[str]:
    return [f"{k}: {v}" for k, v in sorted(RESULTS.items())]
