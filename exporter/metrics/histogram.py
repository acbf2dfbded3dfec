"""The kernel histogram's slot layout, shared by the BPF side (bpf/podnet.h) and the metric model.

Slots are OpenTelemetry exponential buckets at scale HIST_SCALE over seconds; the
constants are the contract between bpf/podnet.h and model.py/otlp.py, kept here (not in
the ctypes mirrors) so the metric and export layers need nothing from exporter.kernel.
"""

from __future__ import annotations

HIST_SLOTS = 164
"""PODNET_HIST_SLOTS: kernel histogram slots (exponential scale 2 over 2^-30 s units)."""
HIST_SCALE = 2
HIST_INDEX_OFFSET = 120
"""Slot i is the OpenTelemetry exponential bucket index i - 120 at scale 2, in seconds."""
