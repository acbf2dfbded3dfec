"""Kernel histogram slot bounds in seconds, for tests that check the slot arithmetic
(tests/unit/test_model.py, tests/kernel/test_hist_slots.py). The exporter itself never needs
them: it maps slots to buckets by index (exporter.metrics.model.downscale_index)."""

from __future__ import annotations

from exporter.metrics.histogram import HIST_INDEX_OFFSET, HIST_SCALE


def slot_upper_bound(slot: int) -> float:
    """Upper bound in seconds of a kernel histogram slot."""
    return float(2.0 ** ((slot - HIST_INDEX_OFFSET + 1) / 2**HIST_SCALE))
