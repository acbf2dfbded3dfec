"""podnet: eBPF network metrics exporter for Kubernetes pods.

The code is layered by concern, one subpackage per layer (each __init__ says what it owns).
A layer imports only the layers in its row, directly or through other modules;
tests/unit/test_layers.py checks this on every `make lint`:

| layer   | owns                                                        | may import              |
|---------|-------------------------------------------------------------|-------------------------|
| pods    | pod metadata, its sources, cgroup id -> pod identity        | (none)                  |
| metrics | metric catalogue, raw poll data, histogram layout, Snapshot | pods                    |
| export  | Prometheus/OpenMetrics rendering, HTTP endpoints, OTLP push | metrics, pods           |
| kernel  | BTF, BPF programs and maps, host probes, kernel headers     | metrics                 |
| app     | configuration, CLI, doctor, poller, service wiring          | kernel, pods, metrics, export |

Every layer may import this package itself (``__version__``). The modules directly in
this package (``__main__``, ``kernel_headers``) are entry points: they may import any layer
and no module imports them.
"""

__version__ = "0.1.0"
