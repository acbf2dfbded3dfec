#!/usr/bin/env bash
# Build podnet's container image with podman, from a Debian 12 base made here by debootstrap:
# no container registry is needed (only Debian's archive and PyPI). Idempotent; run as root.
#
#   scripts/image.sh [build] [TAG]   base (cached) + podman build; TAG default localhost/podnet-exporter:test
#   scripts/image.sh base            only the base image localhost/podnet-base:bookworm
#   scripts/image.sh manifest [TAG]  the Debian packages in an image (name version arch)
#
# Environment:
#   PODNET_DEBIAN_SNAPSHOT=YYYYMMDDTHHMMSSZ  take the base and every package from that dated
#       snapshot of the archive (snapshot.debian.org): the same packages at every build. Unset:
#       deb.debian.org (bookworm + updates + security as of today); the versions installed are
#       then recorded in $cache/*-packages.txt.
#   PODNET_DEBIAN_MIRROR     archive URL when no snapshot is given (default http://deb.debian.org/debian)
#   PODNET_KERNEL_HEADERS_VERSION  linux-headers version for the image (default: the newest offered)
#   PODNET_IMAGE_REFRESH=1   rebuild the cached base
#
# The base is cached (podman image + $cache/base-*.txt) and rebuilt only when the settings that
# made it change, or with PODNET_IMAGE_REFRESH=1: a rerun only rebuilds the changed layers.
# Containers on this host run with runc and tests/image/containers.conf (see docs/IMAGE.md).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cache=/var/lib/podnet/image
base_tag=localhost/podnet-base:bookworm
say() { printf 'image: %s\n' "$*" >&2; }
die() { printf 'image: error: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (debootstrap, podman storage)"
command -v apt-get >/dev/null || die "apt-get not found; the image build supports Debian 12 hosts"

# --- host tools -------------------------------------------------------------------------------
# podman builds and runs; runc runs (crun 1.8 refuses hybrid cgroup v1/v2 hosts); debootstrap
# makes the base.
ensure_tools() {
    local missing=() p
    for p in podman runc debootstrap; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if (( ${#missing[@]} )); then
        say "installing ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# --- base image -------------------------------------------------------------------------------
base_settings() {
    local snap=${PODNET_DEBIAN_SNAPSHOT:-}
    if [[ -n "$snap" ]]; then
        [[ "$snap" =~ ^[0-9]{8}T[0-9]{6}Z$ ]] || die "PODNET_DEBIAN_SNAPSHOT=$snap: want YYYYMMDDTHHMMSSZ"
        mirror=https://snapshot.debian.org/archive/debian/$snap/
        security=https://snapshot.debian.org/archive/debian-security/$snap/
    else
        mirror=${PODNET_DEBIAN_MIRROR:-http://deb.debian.org/debian}
        security=http://deb.debian.org/debian-security
    fi
    settings="suite=bookworm variant=minbase mirror=$mirror security=$security arch=$(dpkg --print-architecture)"
}

make_base() {
    base_settings
    mkdir -p "$cache"
    if [[ "${PODNET_IMAGE_REFRESH:-0}" != 1 ]] && podman image exists "$base_tag" \
        && [[ -f "$cache/base-settings.txt" && "$(cat "$cache/base-settings.txt")" == "$settings" ]]; then
        say "base: $base_tag cached ($settings)"
        return
    fi
    if [[ -n "${PODNET_DEBIAN_SNAPSHOT:-}" ]] && command -v curl >/dev/null; then
        curl -fsS -m 20 -o /dev/null "${mirror}dists/bookworm/Release" \
            || die "snapshot.debian.org unreachable (${mirror}); unset PODNET_DEBIAN_SNAPSHOT to use ${PODNET_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
    fi
    local root="$cache/rootfs"
    rm -rf "$root"
    say "base: debootstrap --variant=minbase bookworm from $mirror"
    local t0=$SECONDS
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1 \
        || { tail -20 "$cache/debootstrap.log" >&2; die "debootstrap failed (log: $cache/debootstrap.log)"; }
    # The image's own apt sources: the same archive, with bookworm-updates and the security
    # archive, so what the Dockerfile installs carries Debian's fixes.
    {
        echo "deb $mirror bookworm main"
        echo "deb $mirror bookworm-updates main"
        echo "deb $security bookworm-security main"
    } >"$root/etc/apt/sources.list"
    if [[ -n "${PODNET_DEBIAN_SNAPSHOT:-}" ]]; then
        # A snapshot's Release files are past their Valid-Until date by design.
        echo 'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/99podnet-snapshot"
    fi
    # The base's packages up to date with that archive, then nothing left of apt's downloads.
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    chroot "$root" sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get update -qq \
        && apt-get -y -qq upgrade >/dev/null && apt-get clean && rm -rf /var/lib/apt/lists/*' \
        || die "apt-get upgrade in the base failed"
    : >"$root/etc/resolv.conf"
    # Slim like Docker's debian:*-slim (debuerreotype): no documentation but licences, no man
    # pages, no translations, now and for every package installed later.
    printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
        'path-exclude /usr/share/groff/*' 'path-exclude /usr/share/info/*' \
        'path-exclude /usr/share/linda/*' 'path-exclude /usr/share/lintian/overrides/*' \
        'path-exclude /usr/share/locale/*' 'path-include /usr/share/locale/locale.alias' \
        'path-exclude /usr/share/man/*' >"$root/etc/dpkg/dpkg.cfg.d/podnet-slim"
    find "$root/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
    find "$root/usr/share/locale" -mindepth 1 ! -type d ! -name locale.alias -delete
    rm -rf "$root"/usr/share/{groff,info,linda,lintian/overrides,man}/*
    find "$root/usr/share/doc" "$root/usr/share/locale" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/apt/* "$root"/var/log/*.log
    dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Package} ${Version} ${Architecture}\n' \
        | sort >"$cache/base-packages.txt"
    # Numeric owners, files in name order: the tar does not depend on the host's users or readdir order.
    podman image rm -f "$base_tag" >/dev/null 2>&1 || true
    tar -C "$root" --numeric-owner --sort=name -c . | podman import -q - "$base_tag" >/dev/null
    rm -rf "$root"
    echo "$settings" >"$cache/base-settings.txt"
    say "base: $base_tag made in $((SECONDS - t0)) s; packages: $cache/base-packages.txt"
}

# --- the image --------------------------------------------------------------------------------
manifest() {
    local tag=$1 mnt
    mnt=$(podman image mount "$tag")
    dpkg-query --admindir="$mnt/var/lib/dpkg" -W -f='${Package} ${Version} ${Architecture}\n' | sort
    podman image unmount "$tag" >/dev/null
}

build() {
    local tag=$1
    local args=(--isolation=chroot --network=host --build-arg "DEBIAN_IMAGE=$base_tag" -t "$tag")
    # pip verifies PyPI's certificate against the system CA bundle, which here must include the
    # host's own CAs: the host's bundle is mounted, for the RUN steps only, where
    # update-ca-certificates adds it to the build stage's bundle when ca-certificates installs.
    # (Not at /etc/ssl/certs/ca-certificates.crt itself: that package's set-up replaces the file.)
    [[ -f /etc/ssl/certs/ca-certificates.crt ]] \
        && args+=(-v /etc/ssl/certs/ca-certificates.crt:/usr/local/share/ca-certificates/podnet-host.crt:ro)
    [[ -n "${PODNET_KERNEL_HEADERS_VERSION:-}" ]] \
        && args+=(--build-arg "KERNEL_HEADERS=$PODNET_KERNEL_HEADERS_VERSION")
    say "podman build -t $tag ($here)"
    local t0=$SECONDS
    podman build "${args[@]}" "$here" >"$cache/build.log" 2>&1 \
        || { tail -40 "$cache/build.log" >&2; die "podman build failed (log: $cache/build.log)"; }
    # Layers no tag uses any more (earlier builds) go after a day; newer ones are the build cache.
    podman image prune -f --filter until=24h >/dev/null 2>&1 || true
    manifest "$tag" >"$cache/image-packages.txt"
    local size
    size=$(podman image inspect --format '{{.Size}}' "$tag")
    say "built $tag in $((SECONDS - t0)) s: $size bytes; packages: $cache/image-packages.txt"
    echo "$tag"
}

cmd=${1:-build}
case "$cmd" in
    build)
        ensure_tools
        make_base
        build "${2:-localhost/podnet-exporter:test}"
        ;;
    base)
        ensure_tools
        make_base
        ;;
    manifest)
        manifest "${2:-localhost/podnet-exporter:test}"
        ;;
    *) die "usage: scripts/image.sh [build [TAG] | base | manifest [TAG]]" ;;
esac
