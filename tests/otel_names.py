"""The OpenTelemetry-to-Prometheus name translation of the compatibility spec, as a backend applies it to
what podnet pushes over OTLP. The exporter never needs it (it sends OpenTelemetry names and exposes
Prometheus names, both from the metric catalogue); the tests use it to check that the two agree
(tests/unit/test_otlp.py)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from exporter.metrics import model as m

# OpenTelemetry unit -> Prometheus unit word, after the OpenTelemetry-to-Prometheus compatibility spec.
_UNIT_WORDS: Final[Mapping[str, str]] = {
    "d": "days",
    "h": "hours",
    "min": "minutes",
    "s": "seconds",
    "ms": "milliseconds",
    "us": "microseconds",
    "ns": "nanoseconds",
    "By": "bytes",
    "KiBy": "kibibytes",
    "MiBy": "mebibytes",
    "GiBy": "gibibytes",
    "TiBy": "tebibytes",
    "KBy": "kilobytes",
    "MBy": "megabytes",
    "GBy": "gigabytes",
    "TBy": "terabytes",
    "m": "meters",
    "V": "volts",
    "A": "amperes",
    "J": "joules",
    "W": "watts",
    "g": "grams",
    "Cel": "celsius",
    "Hz": "hertz",
    "%": "percent",
    "1": "",
}
# The "per" part of a rate unit (By/s -> bytes_per_second) is singular.
_PER_UNIT_WORDS: Final[Mapping[str, str]] = {
    "s": "second",
    "m": "minute",
    "h": "hour",
    "d": "day",
    "w": "week",
    "mo": "month",
    "y": "year",
}
_ANNOTATION: Final = re.compile(r"\{[^}]*\}")
_NOT_WORD: Final = re.compile(r"[^A-Za-z0-9]+")


def _words(text: str) -> list[str]:
    return [w for w in _NOT_WORD.split(text) if w]


def prometheus_name(otel_name: str, otel_unit: str, kind: m.Kind) -> str:
    """The Prometheus name a backend derives from an OpenTelemetry metric (compatibility spec): words
    joined by "_", the unit appended as a word unless already there (annotations like {connection}
    dropped, By -> bytes, s -> seconds, By/s -> bytes_per_second, 1 -> ratio for gauges), and
    "_total" for monotonic sums."""
    words = _words(otel_name)
    if kind is m.Kind.COUNTER and words and words[-1] == "total":
        words.pop()  # re-added last, after the unit
    main, _, per = _ANNOTATION.sub("", otel_unit).strip().partition("/")
    unit_words = _words(_UNIT_WORDS.get(main, main))
    if per:
        unit_words += ["per", *_words(_PER_UNIT_WORDS.get(per, per))]
    if main == "1" and not per and kind is m.Kind.GAUGE:
        unit_words = ["ratio"]
    if unit_words and words[-len(unit_words) :] != unit_words:
        words += unit_words
    if kind is m.Kind.COUNTER:
        words.append("total")
    name = "_".join(words)
    return "_" + name if name[:1].isdigit() else name
