"""OTLP push settings, resolved by exporter.app.config and read by exporter.export.otlp.

A module of its own so that reading the configuration does not import the OpenTelemetry SDK
(exporter.export.otlp is imported only when OTLP is on).
"""

from __future__ import annotations

from dataclasses import dataclass


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
