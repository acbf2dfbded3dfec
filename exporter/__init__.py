"""podnet: eBPF network metrics exporter for Kubernetes pods."""

__version__ = "0.1.0"
