#!/usr/bin/env bash
# Prepare this host for podnet: Debian packages, kernel headers for BCC, tracefs/bpffs
# mounts and a virtualenv in .venv with the project and Debian's BCC importable.
# Idempotent; run as root. Usage: scripts/setup.sh [--test]
set -euo pipefail

want_test=0
[[ "${1:-}" == "--test" ]] && want_test=1

here=$(cd "$(dirname "$0")/.." && pwd)
venv="$here/.venv"
say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (BPF, mounts and apt need it); try: sudo make setup"
command -v apt-get >/dev/null || die "apt-get not found; podnet's setup supports Debian 12 and derivatives"

# --- Debian packages -------------------------------------------------------
pkgs=(python3 python3-venv python3-bpfcc bpftool iproute2 iptables kmod)
(( want_test )) && pkgs+=(prometheus iputils-ping nginx-light nghttp2-client curl)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
apt_updated=0
apt_update() { (( apt_updated )) || { say "apt-get update"; apt-get update -qq; apt_updated=1; }; }
if (( ${#missing[@]} )); then
    apt_update
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- kernel headers for BCC ------------------------------------------------
# podnet compiles against its own merged tree of a Debian headers pair (exporter/kernel/headers.py:
# the -common directory with the flavour directory on top) and writes nothing under /lib/modules.
# Only UAPI definitions and config macros come from the headers (struct layouts come from BTF), so
# the nearest package is fine when none matches the running kernel.
py=/usr/bin/python3
tree=/var/lib/podnet/kernel-headers
kh() { (cd "$here" && "$py" -m exporter.kernel.headers "$@"); }
explicit=${PODNET_KERNEL_HEADERS:-}
explicit_ok=0
if [[ -n "$explicit" ]]; then
    if kh check "$explicit" >/dev/null 2>&1; then
        explicit_ok=1
    else
        say "warning: PODNET_KERNEL_HEADERS=$explicit is not a usable headers tree (doctor will fail on it)"
    fi
fi
if (( explicit_ok )); then
    say "kernel headers: $explicit (PODNET_KERNEL_HEADERS) is usable, left as is"
elif state=$(kh check "$tree" 2>&1); then
    say "kernel headers: $state"
else
    say "kernel headers: ${state#*: }"
    apt_update
    arch=$(dpkg --print-architecture)
    pair=$(apt-cache search --names-only '^linux-headers-' | kh choose --arch "$arch") \
        || die "no linux-headers-<v>-$arch package with its -common package in the apt sources; install a pair by hand, then: python3 -m exporter.kernel.headers build /usr/src/linux-headers-<v>-common /usr/src/linux-headers-<v>-<flavour> $tree"
    read -r flavour_pkg common_pkg <<<"$pair"
    # Unpacked into podnet's own directory, not installed: the packages depend on a kernel
    # image and a compiler, which a node does not need for UAPI headers (and installing a
    # kernel runs initramfs-tools on the user's machine).
    debs=/var/lib/podnet/headers-packages
    unpacked=$debs/$flavour_pkg
    say "kernel $(uname -r): unpacking $flavour_pkg and $common_pkg into $unpacked"
    dl=$(mktemp -d)
    (cd "$dl" && apt-get download -qq -o APT::Sandbox::User=root "$flavour_pkg" "$common_pkg") \
        || { rm -rf "$dl"; die "apt-get download $flavour_pkg $common_pkg failed"; }
    rm -rf "$unpacked" && mkdir -p "$unpacked"
    for deb in "$dl"/*.deb; do dpkg-deb -x "$deb" "$unpacked"; done
    rm -rf "$dl"
    # build checks the merged tree before it replaces the old one.
    built=$(kh build "$unpacked/usr/src/$common_pkg" "$unpacked/usr/src/$flavour_pkg" "$tree" 2>&1) || die "$built"
    # Versions unpacked by earlier runs are no longer linked from the tree.
    find "$debs" -mindepth 1 -maxdepth 1 ! -name "$flavour_pkg" -exec rm -rf {} +
    say "kernel headers: $built"
fi

# --- pseudo filesystems ----------------------------------------------------
mountpoint -q /sys/kernel/tracing || { say "mounting tracefs"; mount -t tracefs nodev /sys/kernel/tracing; }
mountpoint -q /sys/fs/bpf || { say "mounting bpffs"; mount -t bpf bpf /sys/fs/bpf; }

# --- virtualenv ------------------------------------------------------------
if [[ ! -x "$venv/bin/python" ]]; then
    say "creating $venv"
    "$py" -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Debian's BCC is pure Python over libbcc.so; expose just that package to the venv.
bcc_src=/usr/lib/python3/dist-packages/bcc
[[ -d "$bcc_src" ]] || die "$bcc_src missing; install python3-bpfcc"
[[ -e "$site/bcc" ]] || ln -s "$bcc_src" "$site/bcc"

# PyPI dependencies come from the lock (exact versions, hash-checked; `make lock` regenerates it
# from pyproject.toml), then podnet itself, editable and without resolving anything again.
extra=""
lock="$here/requirements.lock"
(( want_test )) && { extra="[test]"; lock="$here/requirements-test.lock"; }
[[ -f "$lock" ]] || die "$lock missing; regenerate it with: make lock"
stamp="$venv/.installed$extra"
if [[ ! -f "$stamp" || "$here/pyproject.toml" -nt "$stamp" || "$lock" -nt "$stamp" ]]; then
    say "installing podnet-exporter$extra into $venv from ${lock##*/}"
    "$venv/bin/pip" install -q --disable-pip-version-check --require-hashes -r "$lock"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps -e "$here"
    touch "$stamp"
fi
"$venv/bin/python" -c 'import bcc, exporter' || die "venv check failed: bcc or exporter not importable"

# --- the exporter's own check ---------------------------------------------
# Setup succeeds only when `run` can work: doctor compiles and attaches every program.
rc=0
report=$("$venv/bin/podnet-exporter" doctor 2>&1) || rc=$?
if (( rc == 0 )); then
    grep -E '^\[ *ok\] kernel headers|^\[warn\]' <<<"$report" | sed 's/^/setup: doctor: /' || true
    say "ready: ${report##*$'\n'}"
else
    fails=$(grep -E '^\[FAIL\]' <<<"$report" || true)
    printf '%s\n' "${fails:-$report}" | sed 's/^/setup: doctor: /' >&2
    die "podnet-exporter doctor failed (exit $rc): fix the above, then run 'make setup' again"
fi
