"""The export layer: how a Snapshot leaves the process. It owns the Prometheus text and
OpenMetrics rendering (prometheus), the published rendered snapshot and the HTTP endpoints
(http_app), and the OTLP push with its settings (otlp, otlp_config). It reads only the
metrics layer's Snapshot (and what that brings along); never the kernel or app layers."""
