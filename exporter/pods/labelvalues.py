"""Label values that every output can carry, whatever the kernel, the filesystem or the
API handed over.

A cgroup directory name is bytes: one that is not UTF-8 reaches Python as lone surrogates
(surrogateescape), and JSON may carry lone surrogates too ("\\udcff"). Neither can be
encoded for /metrics or OTLP, so one such name would fail every render. Here invalid bytes
become \\xNN and lone surrogates \\uNNNN, and values are capped in length, so one odd name
is shown, escaped, and costs nothing else.
"""

from __future__ import annotations

MAX_LEN = 256
"""Characters kept of a label value (Kubernetes names are at most 253)."""


def clean(text: str, limit: int = MAX_LEN) -> str:
    """`text` as valid UTF-8 (invalid bytes and lone surrogates escaped) of at most `limit`
    characters; unchanged (the same object) when it already is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = text.encode("utf-8", "surrogateescape")  # bytes the filesystem gave
        except UnicodeEncodeError:
            raw = text.encode("utf-8", "backslashreplace")  # other lone surrogates
        text = raw.decode("utf-8", "backslashreplace")
    return text if len(text) <= limit else text[:limit]
