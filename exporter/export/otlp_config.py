"""OTLP push settings, resolved by exporter.app.config and read by exporter.export.otlp.

A module of its own so that reading the configuration does not import the OpenTelemetry SDK
(exporter.export.otlp is imported only when OTLP is on).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]*@")


def redact_urls(text: str) -> str:
    """`text` with the credentials of every URL in it (user:password@) replaced by ***."""
    return _USERINFO.sub(r"\1***@", text)


@dataclass(frozen=True)
class OtlpConfig:
    """OTLP push settings; present in :class:`Config` only when an endpoint is configured.

    ``endpoint`` is a full URL used as-is (host:port given for grpc gets ``http://``; the generic
    OTEL_EXPORTER_OTLP_ENDPOINT gets ``/v1/metrics`` appended for http/protobuf, as the spec says).
    ``interval`` and ``timeout`` are seconds. Header names are lowercased because gRPC metadata
    rejects uppercase ones. ``compression`` is None for no compression. ``temporality`` may be
    "lowmemory" when it came from OTEL_EXPORTER_OTLP_METRICS_TEMPORALITY_PREFERENCE.
    """

    endpoint: str
    protocol: str
    interval: float
    timeout: float
    headers: tuple[tuple[str, str], ...]
    insecure: bool
    compression: str | None
    certificate: str | None
    histogram: str
    temporality: str
    resource_attributes: tuple[tuple[str, str], ...]

    @property
    def shown_endpoint(self) -> str:
        """The endpoint as logs may show it: without credentials."""
        return redact_urls(self.endpoint)

    def redact(self, text: str) -> str:
        """`text` (an error from the exporter or the network) without the endpoint's
        credentials or any header value, which may be tokens."""
        text = redact_urls(text)
        for _, value in self.headers:
            if len(value) >= 4:
                text = text.replace(value, "***")
        return text
