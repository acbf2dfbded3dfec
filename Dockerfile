# syntax=docker/dockerfile:1
# podnet-exporter image: Debian 12 with Debian's BCC (python3-bpfcc), the exporter in a virtualenv,
# and its own kernel headers, so it needs nothing from the node but the kernel (BTF, bpf(2)).
#
#   docker build -t podnet-exporter .        (or: scripts/image.sh build, with podman and no registry)
#   docker run --rm --net=host --cap-drop=ALL --cap-add=BPF --cap-add=PERFMON --read-only \
#     --tmpfs /tmp -v /sys/fs/cgroup:/host/sys/fs/cgroup:ro \
#     podnet-exporter run --cgroup-root /host/sys/fs/cgroup --pin-dir none
#
# No /lib/modules and no /usr/src from the host: BCC compiles against the headers tree built here
# (PODNET_KERNEL_HEADERS, below). podnet takes only UAPI definitions and config macros from headers
# and every kernel struct layout from the running kernel's BTF, so headers of any version serve;
# `podnet-exporter doctor` in the container names the tree it uses.
#
# The exporter runs as root: loading eBPF programs needs CAP_BPF and CAP_PERFMON, and Kubernetes
# cannot give capabilities to a non-root user (no ambient capabilities). The Helm chart drops every
# other capability and mounts the root filesystem read-only; see docs/HELM.md.
# BCC comes from Debian, never from PyPI: PyPI's "bcc" is an unrelated package, and Debian's
# python3-bpfcc is the Python binding matching the libbpfcc it depends on.
# PID 1 is the exporter itself: it handles SIGTERM from the first instruction on (start-up
# included) and spawns no children, so no init is needed.

# A pinned base: a digest (debian:bookworm-slim@sha256:...) or, without a registry, a local
# debootstrap of a dated archive (scripts/image.sh).
ARG DEBIAN_IMAGE=debian:bookworm-slim

# ---- build: the virtualenv with the exporter, and the kernel headers tree ------------------------
FROM ${DEBIAN_IMAGE} AS build
ARG DEBIAN_FRONTEND=noninteractive
# Kernel headers version (e.g. 6.12.118+deb12); empty: the newest linux-headers pair in the archive.
ARG KERNEL_HEADERS=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-bpfcc \
    && python3 -m venv /opt/podnet/venv
# Kernel headers: the Debian pair linux-headers-<v>-common + linux-headers-<v>-<arch>, downloaded
# and unpacked (installing them would pull in a kernel image and a compiler), cut to the include
# directories BCC searches, and merged into podnet's tree with the exporter's own tool. Any version
# serves (see above); the default takes the newest the archive offers ("choose" for a release far
# ahead of every package). Done before the exporter is copied in, with only the stdlib-only tool
# (exporter/kernel/headers.py): a change to the exporter does not download the headers again.
COPY exporter/__init__.py /src/headers-tool/exporter/
COPY exporter/kernel/__init__.py exporter/kernel/headers.py /src/headers-tool/exporter/kernel/
RUN set -eu; cd /src/headers-tool; \
    arch=$(dpkg --print-architecture); \
    if [ -n "$KERNEL_HEADERS" ]; then \
        pair="linux-headers-$KERNEL_HEADERS-$arch linux-headers-$KERNEL_HEADERS-common"; \
    else \
        pair=$(apt-cache search --names-only '^linux-headers-' \
            | python3 -m exporter.kernel.headers choose --arch "$arch" --release 999); \
    fi; \
    set -- $pair; flavour=$1; common=$2; \
    mkdir -p /tmp/debs /tmp/unpacked /opt/podnet/headers; \
    (cd /tmp/debs && apt-get download -o APT::Sandbox::User=root "$flavour" "$common"); \
    for deb in /tmp/debs/*.deb; do dpkg-deb -x "$deb" /tmp/unpacked; done; \
    karch=$(python3 -c 'from exporter.kernel.headers import arch_dir; print(arch_dir())'); \
    for pkg in "$flavour" "$common"; do \
        src=/tmp/unpacked/usr/src/$pkg; dst=/opt/podnet/headers/$pkg; \
        mkdir -p "$dst/arch/$karch"; \
        cp -a "$src/include" "$dst/"; \
        cp -a "$src/arch/$karch/include" "$dst/arch/$karch/"; \
    done; \
    python3 -m exporter.kernel.headers build \
        "/opt/podnet/headers/$common" "/opt/podnet/headers/$flavour" /opt/podnet/kernel-headers; \
    python3 -m exporter.kernel.headers check /opt/podnet/kernel-headers; \
    rm -rf /tmp/debs /tmp/unpacked /src/headers-tool
# PyPI dependencies from the runtime lock (exact versions, hash-checked), then the exporter itself
# without resolving anything again: the image gets what CI tested, not whatever is newest today.
COPY requirements.lock /src/
RUN /opt/podnet/venv/bin/pip install --require-hashes -r /src/requirements.lock
COPY pyproject.toml README.md /src/
COPY exporter/ /src/exporter/
RUN /opt/podnet/venv/bin/pip install --no-deps /src \
    # Expose Debian's BCC to the venv, as scripts/setup.sh does: a link, not a copy, so the
    # Python binding always matches the libbpfcc.so installed next to it.
    && site=$(/opt/podnet/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') \
    && ln -s /usr/lib/python3/dist-packages/bcc "$site/bcc" \
    && /opt/podnet/venv/bin/python -c 'import bcc, exporter' \
    # The runtime installs nothing: no pip, no setuptools in the image. pip compiled every
    # module: the .pyc files ship, as the read-only root filesystem allows no writes of them.
    && /opt/podnet/venv/bin/python -m pip uninstall -q -y pip setuptools

# ---- runtime: python3 and BCC's libraries, no compiler toolchain, no apt lists, no docs ------------
FROM ${DEBIAN_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
ARG VERSION=dev
LABEL org.opencontainers.image.title="podnet-exporter" \
      org.opencontainers.image.description="eBPF network metrics exporter for Kubernetes pods" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
# libbpfcc brings LLVM and clang's libraries (BCC compiles at run time), not gcc, make or binutils.
# Documentation is left out (licences kept); apt's lists and caches go in the same layer.
RUN printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
        'path-exclude /usr/share/locale/*' 'path-exclude /usr/share/lintian/*' \
        > /etc/dpkg/dpkg.cfg.d/podnet-nodoc \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-bpfcc \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log
COPY --from=build /opt/podnet/venv /opt/podnet/venv
COPY --from=build /opt/podnet/headers /opt/podnet/headers
COPY --from=build /opt/podnet/kernel-headers /opt/podnet/kernel-headers
COPY bpf/ /opt/podnet/bpf/
# PODNET_BPF_DIR: where the loader finds the eBPF C sources (the installed package has no bpf/ next
# to it). PODNET_KERNEL_HEADERS: the image's own headers tree, and only it (an explicit setting is
# the only candidate: nothing from the host is used even when mounted). No .pyc writes at run time:
# the root filesystem is read-only in the chart.
ENV PATH=/opt/podnet/venv/bin:$PATH \
    PODNET_BPF_DIR=/opt/podnet/bpf \
    PODNET_KERNEL_HEADERS=/opt/podnet/kernel-headers \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER root
EXPOSE 9436
ENTRYPOINT ["podnet-exporter"]
CMD ["run"]
