"""The kernel layer: everything that talks to the kernel and BPF. It reads BTF and resolves
the struct offsets the C code needs (btf, offsets), probes what the host allows
(kernel_probe), finds the headers BCC compiles against (headers), compiles, loads and
attaches the programs of bpf/ (programs, bpf_syscall for what BCC cannot load), mirrors the
maps' key and value layouts in ctypes (bpf_structs), and reads the maps into the plain
values of exporter.metrics.raw once per poll (maps, sockbytes, bpfstats). It may import
exporter.metrics's leaf modules that define those values (raw, histogram), nothing else
outside itself."""
