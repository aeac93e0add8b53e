#!/usr/bin/env bash
# Builds the pdserve CPU image (deploy/container/Containerfile) with podman, offline from any
# container registry: the base image is a Debian bookworm rootfs made with debootstrap and imported.
#   deploy/container/build-image.sh [TAG]     (default localhost/pdserve:cpu; needs root)
# It installs podman, runc and debootstrap if missing, configures podman for this kind of host
# (runc: crun fails on hybrid cgroups; no default ulimits: raising rlimits is not permitted), makes
# the base image once (localhost/pdserve-base:bookworm), builds pdserve's wheels from this checkout
# and builds the image on them. PDSERVE_BUILD_CA names the CA bundle pip in the build trusts
# (default: this host's system bundle).
set -euo pipefail
cd "$(dirname "$0")/../.."
tag="${1:-localhost/pdserve:cpu}"
base="localhost/pdserve-base:bookworm"
say() { echo "pdserve image: $*"; }

missing=""
for tool in podman runc debootstrap; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
if [ -n "$missing" ]; then
    say "installing$missing (apt)"
    apt-get update -qq
    # shellcheck disable=SC2086 # one word per package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

conf=/etc/containers/containers.conf
if ! grep -qs '^default_ulimits = \[\]' "$conf" || ! grep -qs '^runtime = "runc"' "$conf"; then
    say "configuring $conf (runtime runc, no default ulimits)"
    mkdir -p /etc/containers
    [ -f "$conf" ] && cp "$conf" "$conf.pdserve-backup"
    cat > "$conf" <<'CONF'
[containers]
default_ulimits = []

[engine]
runtime = "runc"
CONF
fi

if ! podman image exists "$base"; then
    rootfs="$(mktemp -d /var/tmp/pdserve-rootfs.XXXXXX)"
    trap 'rm -rf "$rootfs"' EXIT
    say "making $base with debootstrap (a few minutes)"
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$rootfs.log" 2>&1 \
        || { tail -n 20 "$rootfs.log" >&2; exit 1; }
    rm -f "$rootfs.log"
    tar -C "$rootfs" -c . | podman import --quiet --change 'CMD ["/bin/bash"]' - "$base" >/dev/null
    rm -rf "$rootfs"
    trap - EXIT
fi

context="$(mktemp -d /var/tmp/pdserve-image.XXXXXX)"
trap 'rm -rf "$context"' EXIT
say "building pdserve's wheels from this checkout"
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
"$python" -m pip wheel --quiet --wheel-dir "$context/wheels" . >"$context/pip.log" 2>&1 \
    || { tail -n 20 "$context/pip.log" >&2; exit 1; }
# The image installs these versions; pip there fetches only what its Python needs on top (the image's
# Python 3.11 may be an older patch release with dependencies of its own).
for wheel in "$context"/wheels/*.whl; do
    basename "$wheel" | awk -F- '{print $1 "==" $2}'
done > "$context/wheels/constraints.txt"
cp deploy/container/Containerfile "$context/"
say "building $tag"
# pip in the build trusts what this host's pip trusts (a proxy's CA, say); a build secret, so the
# bundle stays out of the image's layers.
ca_bundle="${PDSERVE_BUILD_CA:-/etc/ssl/certs/ca-certificates.crt}"
podman build --runtime runc --secret "id=ca,src=$ca_bundle" --tag "$tag" \
    --file "$context/Containerfile" "$context"
say "$tag: $(podman image inspect --format '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1 / 1e6}')"
