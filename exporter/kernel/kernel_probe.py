"""What the running kernel lets podnet use, probed with bpf(2) before anything compiles.

The hot path's preferred build (BTF-typed tracepoints with per-socket counters in a mapped
array) needs three things beyond what every build needs: a tp_btf program that loads and
attaches, an array map that can be mapped into memory, and a stack map (its free slots).
Hosts differ in all three: old kernels lack them, and locked-down or sandboxed hosts refuse
some program and map types that the kernel has. Each probe creates the smallest object of
its kind and closes it at once. The loader does not depend on the answer (it tries the
preferred build and says why it fell back); doctor and the tests use it to know what to
expect on this host.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass

from exporter.kernel.bpf_syscall import (
    BPF_F_MMAPABLE,
    BPF_MAP_TYPE_ARRAY,
    BPF_MAP_TYPE_STACK,
    BpfSyscallError,
    attach_tp_btf,
    create_map,
    load_tp_btf_insns,
    map_array,
)
from exporter.kernel.btf import Btf

# r0 = 0; exit: the smallest program the verifier accepts.
_RETURN_ZERO = bytes.fromhex("b7000000000000009500000000000000")
PROBE_TRACEPOINT = "sock_send_length"


@dataclass(frozen=True)
class Probe:
    feature: str
    refused: str = ""
    """Empty when the kernel allows the feature, else what it said."""

    @property
    def ok(self) -> bool:
        return not self.refused


def probe_tp_btf(btf: Btf, tracepoint: str = PROBE_TRACEPOINT) -> Probe:
    feature = f"tp_btf program on {tracepoint}"
    type_id = btf.tracepoint_type_id(tracepoint)
    if type_id is None:
        return Probe(feature, f"kernel BTF has no btf_trace_{tracepoint}")
    insns = ctypes.create_string_buffer(_RETURN_ZERO, len(_RETURN_ZERO))
    try:
        prog = load_tp_btf_insns(ctypes.addressof(insns), len(_RETURN_ZERO) // 8, "podnet_probe", type_id)
    except (BpfSyscallError, OSError) as e:
        return Probe(feature, str(e))
    try:
        os.close(attach_tp_btf(prog))
    except BpfSyscallError as e:
        return Probe(feature, str(e))
    finally:
        os.close(prog)
    return Probe(feature)


def probe_mapped_array() -> Probe:
    feature = "array map mapped into memory"
    try:
        fd = create_map(BPF_MAP_TYPE_ARRAY, 4, 8, 1, BPF_F_MMAPABLE)
    except OSError as e:
        return Probe(feature, f"creating it failed: {e.strerror}")
    try:
        map_array(fd, ctypes.c_uint64, 1).close()
    except BpfSyscallError as e:
        return Probe(feature, str(e))
    finally:
        os.close(fd)
    return Probe(feature)


def probe_stack_map() -> Probe:
    feature = "stack map"
    try:
        os.close(create_map(BPF_MAP_TYPE_STACK, 0, 4, 1))
    except OSError as e:
        return Probe(feature, f"creating it failed: {e.strerror}")
    return Probe(feature)


def probe_preferred_build(btf: Btf) -> list[Probe]:
    """Every probe of the hot path's preferred build, allowed or not."""
    return [probe_tp_btf(btf), probe_mapped_array(), probe_stack_map()]


def preferred_build_refused(probes: list[Probe]) -> str:
    """Empty when the preferred build can load here, else why not (one line)."""
    return "; ".join(f"{p.feature} refused: {p.refused}" for p in probes if not p.ok)
