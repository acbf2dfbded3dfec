#!/usr/bin/env bash
# Proof from zero (issue 12): build a clean Debian 12 root, enter it the way a new machine is
# (minbase only: no make, no kernel headers, no /lib/modules entry for this kernel, no tracefs or
# bpffs mounted), follow the README's first step, then run `make setup-test` and the kernel tests
# against the running kernel. A set-up that only works on a hand-tuned machine fails here.
#
# Usage (as root): make test-fresh   or   tests/fresh/run.sh
#   FRESH_SOURCE=head|worktree  what goes into the root: the committed HEAD (default; what CI lands)
#                               or the working tree's tracked and untracked, not ignored, files
#   FRESH_PYTEST_ARGS="..."     arguments for pytest after tests/kernel, as a shell would split
#                               them (default: -q; e.g. "-q -k 'requests or churn'")
#   FRESH_MIRROR=URL            Debian mirror for debootstrap (default: the host's apt source)
#   FRESH_CACHE=1               developers only: reuse a cached minbase root instead of running
#                               debootstrap (CI never sets it: the proof starts from zero)
#   FRESH_KEEP=1                keep the root afterwards for debugging (printed at the end)
# Exit status: that of the first phase that failed, else pytest's (2 for the harness's own errors).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
scratch=/var/tmp/podnet-fresh
suite=bookworm
source_mode=${FRESH_SOURCE:-head}
pytest_args=${FRESH_PYTEST_ARGS:--q}

say() { printf 'fresh: %s\n' "$*"; }
die() { printf 'fresh: error: %s\n' "$*" >&2; exit 2; }
now() { date +%s; }

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, mounts, BPF); try: sudo make test-fresh"
[[ $source_mode == head || $source_mode == worktree ]] || die "FRESH_SOURCE must be head or worktree, not '$source_mode'"
for tool in unshare chroot findmnt; do
    command -v "$tool" >/dev/null || die "$tool not found (util-linux, coreutils)"
done
if ! command -v debootstrap >/dev/null; then
    say "installing debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi

# --- scratch space and cleanup -------------------------------------------
mkdir -p "$scratch"
work=$(mktemp -d "$scratch/run.XXXXXX")
root=$work/root
timings=$work/timings
mkdir "$root"
: >"$timings"
t_start=$(now)
child=

record() { printf '%-12s %5ss\n' "$1" "$2" >>"$timings"; }

# Processes started inside the root (a daemon a package left running, a test's stray child)
# would keep its mount namespace alive; they are ours, so end them before removing the root.
# shellcheck disable=SC2317  # called from the EXIT trap
kill_root_procs() {
    local sig=$1 pid found=1
    for pid in /proc/[0-9]*; do
        [[ $pid/root/ -ef $root/ ]] 2>/dev/null || continue
        kill "-$sig" "${pid#/proc/}" 2>/dev/null || true
        found=0
    done
    return "$found"
}

# shellcheck disable=SC2317  # the EXIT trap
cleanup() {
    local rc=$? _
    trap - EXIT INT TERM
    if [[ -n $child ]]; then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    if kill_root_procs TERM; then
        for _ in 1 2 3 4 5; do sleep 1; kill_root_procs 0 || break; done
        kill_root_procs KILL || true
    fi
    record total $(($(now) - t_start))
    say "timings (seconds):"
    sed 's/^/fresh:   /' "$timings"
    if [[ ${FRESH_KEEP:-0} == 1 ]]; then
        say "kept $work (FRESH_KEEP=1); remove it with: rm -rf --one-file-system $work"
    else
        # Every mount was made in the run's private namespace and died with it; refuse to delete
        # through a mount that is somehow visible here rather than risk the host's files.
        if findmnt -rn -o TARGET | grep -q -F "$root"; then
            say "mounts still visible under $root; left in place" >&2
        else
            rm -rf --one-file-system "$work"
        fi
    fi
    say "exit status $rc"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- phase 1: a clean Debian 12 root ---------------------------------------
# The mirror the host's apt uses for bookworm, so the root reaches the archive the same way.
# shellcheck disable=SC2016  # $(...) there is apt's format syntax, not the shell's
mirror=${FRESH_MIRROR:-$(apt-get indextargets --no-release-info --format '$(REPO_URI) $(RELEASE)' \
    | awk -v s="$suite" '$2 == s {print $1; exit}')}
[[ -n $mirror ]] || die "no apt source for $suite on this host; set FRESH_MIRROR=URL"
# debootstrap fetches with wget, not apt: hand it the proxy apt would use, if any.
proxy=$(apt-config dump --format '%v' Acquire::http::Proxy 2>/dev/null || true)
[[ -n $proxy && $proxy != DIRECT ]] && export http_proxy=$proxy

t=$(now)
cache=$scratch/cache/minbase-$suite-$(printf '%s' "$mirror" | sha256sum | cut -c1-12).tar
if [[ ${FRESH_CACHE:-0} == 1 && -f $cache ]]; then
    say "FRESH_CACHE=1: unpacking $cache (made $(date -r "$cache" '+%F %R'))"
    tar -x --numeric-owner -f "$cache" -C "$root"
    record debootstrap-cached $(($(now) - t))
else
    say "debootstrap --variant=minbase $suite $root $mirror"
    debootstrap --variant=minbase "$suite" "$root" "$mirror"
    if [[ ${FRESH_CACHE:-0} == 1 ]]; then
        mkdir -p "${cache%/*}"
        tar -c --numeric-owner -f "$cache.tmp" -C "$root" . && mv "$cache.tmp" "$cache"
        say "cached the root in $cache"
    fi
    record debootstrap $(($(now) - t))
fi

# --- phase 2: network access as the host has it, and the source ------------
t=$(now)
# apt: the host's sources (a fresh machine has the distribution's own), the keyrings they name,
# and the apt.conf.d files that govern reaching the archive (proxies, CA, this archive's expired
# Release dates). Caches, languages and other tuning stay the host's.
rm -f "$root/etc/apt/sources.list"
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
    [[ -s $f ]] || continue
    mkdir -p "$root${f%/*}"
    cp "$f" "$root$f"
    for key in $(grep -ohiE '/[^] ,]+\.(gpg|asc)' "$f" || true); do
        [[ -f $key && ! -e $root$key ]] && { mkdir -p "$root${key%/*}"; cp "$key" "$root$key"; }
    done
done
for f in /etc/apt/apt.conf.d/*; do
    [[ -f $f ]] || continue
    grep -qiE 'Acquire::(Check-Valid-Until|Check-Date|[a-z]+::(Proxy|CaInfo|Verify-Peer|Verify-Host)|Proxy)' "$f" \
        && cp "$f" "$root/etc/apt/apt.conf.d/"
done
# Installing packages in a chroot must not start their daemons (prometheus): outside any service
# manager they would outlive the run and hold the host's ports. The usual chroot convention.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
# TLS: this network's egress CA. The bundle serves pip now; the local CA files make
# update-ca-certificates keep it if a package installs ca-certificates later.
if [[ -d /usr/local/share/ca-certificates ]]; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp -a /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
fi
mkdir -p "$root/etc/ssl/certs"
[[ -f /etc/ssl/certs/ca-certificates.crt ]] && cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
cp -L /etc/resolv.conf "$root/etc/resolv.conf"
# Every installed Debian has /etc/hosts (the installer or cloud-init writes it); debootstrap does
# not. Without it, looking up localhost or 0.0.0.0 (http.server does) falls through to DNS and
# waits for its timeout inside the tests' network namespaces. The installer's content:
[[ -e $root/etc/hosts ]] || printf '127.0.0.1\tlocalhost\n127.0.1.1\t%s\n::1\tlocalhost ip6-localhost ip6-loopback\n' \
    "$(hostname)" >"$root/etc/hosts"
# pip: the host's network settings (CA, index, proxy, timeouts) and nothing that points at this
# host's local wheel directories or file:// indexes (find-links, extra-index-url, constraints):
# packages come from PyPI as for a new user.
python3 - "$root/etc/pip.conf" <<'EOF'
import subprocess, sys
keep = {"cert", "client-cert", "index-url", "extra-index-url", "proxy", "trusted-host",
        "timeout", "default-timeout", "retries"}
try:
    out = subprocess.run(["/usr/bin/python3", "-m", "pip", "config", "list"], capture_output=True,
                         text=True, check=False).stdout
except OSError:
    out = ""
conf = {}
for line in out.splitlines():
    name, _, value = line.partition("=")
    key = name.rsplit(".", 1)[-1]
    value = value.strip().strip("'")
    if key not in keep or not value:
        continue
    if key not in ("cert", "client-cert"):  # the CA bundle is copied; local indexes are not
        value = " ".join(v for v in value.split() if not v.startswith(("file:", "/")))
    if value:
        conf[key] = value
with open(sys.argv[1], "w") as f:
    f.write("# network settings copied from the host by tests/fresh/run.sh\n[global]\n")
    f.writelines(f"{k} = {v}\n" for k, v in sorted(conf.items()))
EOF
say "pip.conf in the root: $(grep -v '^#' "$root/etc/pip.conf" | tr '\n' ' ')"

dest=/root/podnet
mkdir -p "$root$dest"
if [[ $source_mode == head ]]; then
    say "source: committed HEAD $(git -C "$repo" rev-parse --short HEAD)"
    git -C "$repo" archive --format=tar HEAD | tar -x -C "$root$dest"
else
    say "source: working tree of $repo (FRESH_SOURCE=worktree; uncommitted changes included)"
    git -C "$repo" ls-files -z --cached --others --exclude-standard \
        | (cd "$repo" && while IFS= read -r -d '' f; do if [[ -e $f ]]; then printf '%s\0' "$f"; fi; done) \
        | tar -c -C "$repo" --null -T - -f - | tar -x -C "$root$dest"
fi
# The README's Requirements say what a new machine needs before `make`; run exactly that.
first=$(awk '/^## /{inreq = ($0 ~ /^## Requirements/)} inreq && /^[[:space:]]*(sudo[[:space:]]+)?apt-get[[:space:]]/' \
    "$root$dest/README.md" | sed -E 's/^[[:space:]]*(sudo[[:space:]]+)?//')
[[ -n $first ]] || die "README.md's Requirements name no apt-get line for a fresh machine (make is not in Debian's minbase)"
record prepare $(($(now) - t))

# --- phases 3-5: first step, set-up, kernel tests, in a private mount namespace ---
# In the background and waited for: bash runs a trap only once the foreground command is done,
# and an interrupted run must clean up now. cleanup ends this child first.
FRESH_FIRST=$first FRESH_DEST=$dest FRESH_PYTEST_ARGS=$pytest_args FRESH_TIMINGS=$timings \
    unshare --mount --propagation private -- bash "$here/inside.sh" "$root" &
child=$!
rc=0
wait "$child" || rc=$?
child=
exit "$rc"
