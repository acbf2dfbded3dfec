"""The metrics layer: what podnet exports and how one poll's raw data becomes it. It owns the
metric catalogue and the immutable Snapshot (model), the kernel histogram layout
(histogram), the raw per-poll values and kernel codes the kernel layer produces (raw), the
flow-peer labels (peers), dead cgroups' retained values (lifecycle) and the pure raw ->
Snapshot step (snapshot). It may import the pods layer for identities and pod metadata;
never the kernel, export or app layers."""
