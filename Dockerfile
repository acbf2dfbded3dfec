# syntax=docker/dockerfile:1
# podnet-exporter image: Debian 12 with Debian's BCC (python3-bpfcc), the exporter in a virtualenv.
#
#   docker build -t podnet-exporter .
#   docker run --rm --net=host --cap-drop=ALL --cap-add=BPF --cap-add=PERFMON --cap-add=SYS_RESOURCE \
#     --cap-add=DAC_READ_SEARCH -v /lib/modules:/lib/modules:ro -v /usr/src:/usr/src:ro \
#     -v /sys/fs/cgroup:/host/sys/fs/cgroup:ro podnet-exporter run --cgroup-root /host/sys/fs/cgroup
#
# The exporter runs as root: loading eBPF programs needs CAP_BPF and CAP_PERFMON, and Kubernetes
# cannot give capabilities to a non-root user (no ambient capabilities). The Helm chart drops every
# other capability and mounts the root filesystem read-only; see docs/HELM.md.
# BCC comes from Debian, never from PyPI: PyPI's "bcc" is an unrelated package, and Debian's
# python3-bpfcc is the Python binding matching the libbpfcc it depends on.

ARG DEBIAN_IMAGE=debian:bookworm-slim

# ---- base: the runtime packages, shared by both stages ------------------------------------------
FROM ${DEBIAN_IMAGE} AS base
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-bpfcc \
    && rm -rf /var/lib/apt/lists/*

# ---- build: the virtualenv with the exporter and its PyPI dependencies ---------------------------
FROM base AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
RUN python3 -m venv /opt/podnet/venv
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
    && /opt/podnet/venv/bin/python -c 'import bcc, exporter'

# ---- runtime ------------------------------------------------------------------------------------
FROM base
ARG VERSION=dev
LABEL org.opencontainers.image.title="podnet-exporter" \
      org.opencontainers.image.description="eBPF network metrics exporter for Kubernetes pods" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /opt/podnet/venv /opt/podnet/venv
COPY bpf/ /opt/podnet/bpf/
# PODNET_BPF_DIR: where the loader finds the eBPF C sources (the installed package has no bpf/ next
# to it). No .pyc writes at run time: the root filesystem is read-only in the chart.
ENV PATH=/opt/podnet/venv/bin:$PATH \
    PODNET_BPF_DIR=/opt/podnet/bpf \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER root
EXPOSE 9436
ENTRYPOINT ["podnet-exporter"]
CMD ["run"]
