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
(( want_test )) && pkgs+=(prometheus iputils-ping)
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
krel=$(uname -r)
kdir=/lib/modules/$krel
if [[ -e "$kdir/build" || -L "$kdir/build" ]]; then
    say "kernel headers: $kdir/build present, left as is"
else
    arch=$(dpkg --print-architecture)
    apt_update
    # Pick the headers package nearest to the running kernel: the same version if Debian
    # has it, else the newest release not newer than it, else the newest at all.
    pick=$(apt-cache search --names-only "^linux-headers-[0-9].*-$arch\$" | awk '{print $1}' \
        | grep -v -- '-rt-' | sed "s/^linux-headers-//; s/-$arch\$//" | sort -uV \
        | python3 -c '
import re, sys
run = tuple(int(x) for x in re.findall(r"\d+", sys.argv[1])[:3])
def ver(s): return tuple(int(x) for x in re.findall(r"\d+", s)[:3])
cands = [l.strip() for l in sys.stdin if l.strip()]
# Prefer the cloud flavour: it is what cloud VMs run and its config is closest.
exact = [c for c in cands if c.startswith(sys.argv[1].split("-")[0] + "-")]
older = [c for c in cands if ver(c) <= run]
best = (exact or older or cands or [""])[-1]
print(best)' "$krel")
    [[ -n "$pick" ]] || die "no linux-headers package found for $arch; install headers for $krel and link them to $kdir/build"
    flavour=$arch
    apt-cache show "linux-headers-$pick-cloud-$arch" >/dev/null 2>&1 && flavour="cloud-$arch"
    pkg="linux-headers-$pick-$flavour"
    say "kernel $krel has no headers; installing nearest: $pkg"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$pkg" >/dev/null
    mkdir -p "$kdir"
    ln -s "/usr/src/linux-headers-$pick-$flavour" "$kdir/build"
    if [[ ! -e "$kdir/source" && ! -L "$kdir/source" ]]; then
        ln -s "/usr/src/linux-headers-$pick-common" "$kdir/source"
    fi
fi

# --- pseudo filesystems ----------------------------------------------------
mountpoint -q /sys/kernel/tracing || { say "mounting tracefs"; mount -t tracefs nodev /sys/kernel/tracing; }
mountpoint -q /sys/fs/bpf || { say "mounting bpffs"; mount -t bpf bpf /sys/fs/bpf; }

# --- virtualenv ------------------------------------------------------------
py=/usr/bin/python3
if [[ ! -x "$venv/bin/python" ]]; then
    say "creating $venv"
    "$py" -m venv "$venv"
fi
site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# Debian's BCC is pure Python over libbcc.so; expose just that package to the venv.
bcc_src=/usr/lib/python3/dist-packages/bcc
[[ -d "$bcc_src" ]] || die "$bcc_src missing; install python3-bpfcc"
[[ -e "$site/bcc" ]] || ln -s "$bcc_src" "$site/bcc"

extra=""
(( want_test )) && extra="[test]"
stamp="$venv/.installed$extra"
if [[ ! -f "$stamp" || "$here/pyproject.toml" -nt "$stamp" ]]; then
    say "installing podnet-exporter$extra into $venv"
    "$venv/bin/pip" install -q --disable-pip-version-check -e "$here$extra"
    touch "$stamp"
fi
"$venv/bin/python" -c 'import bcc, exporter' || die "venv check failed: bcc or exporter not importable"
say "ready"
