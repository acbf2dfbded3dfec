#!/usr/bin/env bash
# Second half of tests/fresh/run.sh, run by it under `unshare --mount --propagation private`:
# give the root what a booted machine has, then run the README's first step, `make setup-test`
# and the kernel tests in it. Every mount here lives and dies with this private namespace.
# Usage: inside.sh ROOT   (environment: FRESH_FIRST, FRESH_DEST, FRESH_PYTEST_ARGS, FRESH_TIMINGS)
set -euo pipefail

root=$1
krel=$(uname -r)
say() { printf 'fresh: %s\n' "$*"; }
now() { date +%s; }

# The root must be a mount point of its own: `ip netns exec` and `ip -n` run
# `mount --make-rslave /`, which fails with EINVAL on a plain directory (a bare chroot).
mount --bind "$root" "$root"
mount -t proc proc "$root/proc"
# rbind: /sys/fs/cgroup/* (the hybrid layout's cgroup2 at .../unified) and /sys/kernel/btf come along.
mount --rbind /sys "$root/sys"
# rbind: /dev/pts, /dev/shm and /dev/net/tun (the delay-line tests use TUN).
mount --rbind /dev "$root/dev"
# `ip netns add` keeps its namespaces under /run/netns, podsim its registry under /run: a fresh,
# empty /run as after boot, and nothing shared with the host's test runs.
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs "$root/run"
# This machine kind boots without tracefs, debugfs and bpffs (KERNEL-NOTES.md); the host's may be
# mounted by hand. Drop them in this namespace so the set-up has to mount what it needs.
for m in sys/kernel/debug sys/kernel/tracing sys/fs/bpf; do
    if mountpoint -q "$root/$m"; then umount -l "$root/$m"; fi
done

# The point of the run: no kernel headers and no /lib/modules entry for this kernel to start from.
[[ ! -e $root/lib/modules/$krel ]] || { say "error: $root/lib/modules/$krel exists in a fresh root" >&2; exit 2; }
if compgen -G "$root/usr/src/linux-headers-*" >/dev/null; then
    say "error: kernel headers in a fresh root: $(echo "$root"/usr/src/linux-headers-*)" >&2
    exit 2
fi

# A login's environment, not the caller's: only what a root shell on a new machine has.
# DEBIAN_FRONTEND: no terminal here (CI has no stdin) for debconf to ask on.
in_root() {
    chroot "$root" /usr/bin/env -i \
        PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
        TERM="${TERM:-dumb}" CI="${CI:-}" DEBIAN_FRONTEND=noninteractive \
        /bin/bash -euo pipefail -c "cd $FRESH_DEST && $1" </dev/null
}

phase() {
    local name=$1 cmd=$2 t rc=0
    say "=== $name: $cmd"
    t=$(now)
    in_root "$cmd" || rc=$?
    printf '%-12s %5ss\n' "$name" $(($(now) - t)) >>"$FRESH_TIMINGS"
    if ((rc)); then
        say "=== $name FAILED (exit $rc)"
        exit "$rc"
    fi
}

phase first-step "$FRESH_FIRST"
phase setup "make setup-test"
if [[ -e $root/lib/modules/$krel ]]; then
    say "note: the set-up created /lib/modules/$krel:" \
        "$(find "$root/lib/modules/$krel" -mindepth 1 -maxdepth 1 -printf '%f -> %l; ')"
fi
# What `make test-kernel` runs after its set-up (done just above), called directly so that the
# exit status is pytest's own (make turns every failure into 2).
phase tests ".venv/bin/python -m pytest tests/kernel $FRESH_PYTEST_ARGS"
