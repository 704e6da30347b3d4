#!/usr/bin/env bash
# Build the real Dockerfile where there is no Docker daemon and the registries that host its
# base images (nvidia/cuda, ghcr.io's uv) cannot be reached: as root, with Debian's buildah and
# mmdebstrap (apt-get install buildah mmdebstrap). Only build arguments differ from a plain
# `docker build`:
#   BASE_IMAGE  a Debian bookworm minbase made by mmdebstrap (CPU only: no CUDA userland; the
#               PyTorch wheel brings its own CUDA libraries either way);
#   UV_IMAGE    an image holding /uv, taken from uv's wheel on PyPI, at the Dockerfile's version;
#   UV_CACHE_DIR  the host's uv cache, mounted in, so a machine with a warm cache downloads nothing;
#   secret ca-bundle  the host's CA bundle, for machines whose HTTPS goes through a TLS-inspecting
#               proxy (used by the build's downloads, never stored in the image).
# Both local images are made once and reused (remove them to remake them). Result: $IMAGE.
#
#   bash docker/build-local.sh        # IMAGE=localhost/sonar-llm-server:local by default
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-localhost/sonar-llm-server:local}
SUITE=${SUITE:-bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
HOST_UV_CACHE=${UV_CACHE_DIR:-$(python3 -m uv cache dir 2>/dev/null || echo "$HOME/.cache/uv")}
# chroot: no runc/crun (nor the privileges they need) for the build's RUN steps. Storage is
# buildah's default (containers-storage.conf: overlay where the kernel has it), which
# tests/test_image.py uses too.
export BUILDAH_ISOLATION=chroot

# The uv version is the one the Dockerfile pins (ARG UV_IMAGE=...:VERSION): written once, there.
UV_VERSION=$(sed -n 's/^ARG UV_IMAGE=.*:\([0-9][0-9.]*\)$/\1/p' Dockerfile)
[ -n "$UV_VERSION" ] || { echo "no ARG UV_IMAGE=...:VERSION in the Dockerfile" >&2; exit 1; }
BASE_IMAGE=localhost/sonar-llm-base:$SUITE
UV_IMAGE=localhost/uv:$UV_VERSION

exists() { buildah inspect --type image "$1" >/dev/null 2>&1; }
step() { echo "== $* ($(date -u +%T))"; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if ! exists "$BASE_IMAGE"; then
    step "base image $BASE_IMAGE from mmdebstrap --variant=minbase $SUITE"
    mmdebstrap --quiet --variant=minbase "$SUITE" "$work/base.tar"
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$work/base.tar" / >/dev/null
    buildah config --cmd /bin/bash "$ctr"
    buildah commit --quiet --rm "$ctr" "$BASE_IMAGE" >/dev/null
fi

if ! exists "$UV_IMAGE"; then
    step "uv image $UV_IMAGE from uv's wheel on PyPI"
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" \
        --platform manylinux_2_17_x86_64 "uv==$UV_VERSION"
    python3 -m zipfile -e "$work"/uv-"$UV_VERSION"-*.whl "$work/uv"
    install -m 0755 "$work/uv/uv-$UV_VERSION.data/scripts/uv" "$work/uv-bin"
    ctr=$(buildah from scratch)
    buildah copy "$ctr" "$work/uv-bin" /uv >/dev/null
    buildah commit --quiet --rm "$ctr" "$UV_IMAGE" >/dev/null
fi

step "image $IMAGE from the Dockerfile"
# The previous image is removed once the new one is tagged: each is several GB.
previous=$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE" 2>/dev/null || true)
mkdir -p "$HOST_UV_CACHE"
secret=()
[ -s "$CA_BUNDLE" ] && secret=(--secret "id=ca-bundle,src=$CA_BUNDLE")
# --format docker keeps HEALTHCHECK (the OCI format has no field for it). No --layers: the stage
# is one working container committed once. That commit writes two temporary copies of the
# multi-GB layer under TMPDIR (/var/tmp by default) before storing it: where the disk is short,
# TMPDIR=/dev/shm keeps them in memory (CI does; ~15 GB, so only on a machine that has it).
buildah build --format docker --network host --tag "$IMAGE" \
    --build-arg "BASE_IMAGE=$BASE_IMAGE" \
    --build-arg "UV_IMAGE=$UV_IMAGE" \
    --build-arg "UV_CACHE_DIR=/host-uv-cache" \
    --volume "$HOST_UV_CACHE:/host-uv-cache" \
    "${secret[@]}" \
    . 2>&1 | while IFS= read -r line; do printf '%(%T)T %s\n' -1 "$line"; done  # step times
# buildah 1.28 leaves a working container behind for the stage that only names the uv image.
buildah containers --quiet --filter "ancestor=$UV_IMAGE" | xargs --no-run-if-empty buildah rm >/dev/null
current=$(buildah inspect --type image --format '{{.FromImageID}}' "$IMAGE")
if [ -n "$previous" ] && [ "$previous" != "$current" ]; then
    buildah rmi "$previous" >/dev/null 2>&1 || echo "kept the previous image $previous (in use)"
fi
step "built $IMAGE"
