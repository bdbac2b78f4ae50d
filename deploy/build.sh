#!/usr/bin/env bash
# Build every image deploy/docker-compose.yml runs, with no image registry needed:
#
#   deploy/build.sh            # from anywhere; `make up` and deploy/smoke.sh call it
#
# - the base: BASE_IMAGE when set (pulled if the daemon lacks it), else a Debian bookworm image
#   made here with debootstrap and `docker import` (kasmina/debian-python:bookworm; needs root
#   and debootstrap; only Debian's archive is reached);
# - Redis and Prometheus from Debian's packages (deploy/tools/Dockerfile), unless REDIS_IMAGE /
#   PROMETHEUS_IMAGE name other images (then those are used as they are);
# - karn, tamiyo, kasmina (deploy/Dockerfile) as ${IMAGE_PREFIX:-kasmina}/NAME:${IMAGE_TAG:-latest};
#   GPU=1 builds kasmina-cuda instead of kasmina (docker-compose.gpu.yml).
#
# Builds use `docker build --network host`: the daemon this project documents runs with
# `--bridge=none`, where a build container on the default network has no network at all. The
# context is the repository's tracked and untracked-but-not-ignored files (the legacy builder
# would otherwise send .venv and runs/, gigabytes), plus the ignored inputs the images want:
# deploy/wheels/*.whl, deploy/certs/*.crt, a CPU torch wheel from TORCH_WHEEL or pip's
# find-links, and this host's extra CAs (HOST_CA_DIR, default /usr/local/share/ca-certificates;
# HOST_CA_DIR= to skip) for a TLS-inspecting proxy in front of PyPI.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PREFIX=${IMAGE_PREFIX:-kasmina}
TAG=${IMAGE_TAG:-latest}
DEBIAN_BASE=kasmina/debian-python:bookworm
BASE=${BASE_IMAGE:-$DEBIAN_BASE}
WORK=$(mktemp -d /tmp/kasmina-build.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
step() { printf '== %s (%ds)\n' "$*" "$SECONDS"; }

docker info >/dev/null 2>&1 || {
    echo "build: no Docker daemon answers (deploy/README.md, 'Docker on this machine')" >&2; exit 2; }

step "base image $BASE"
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    if [ "$BASE" != "$DEBIAN_BASE" ]; then
        docker pull "$BASE"
    else
        command -v debootstrap >/dev/null || {
            echo "build: no image $BASE and no debootstrap to make it (apt-get install debootstrap," \
                 "or set BASE_IMAGE=python:3.11-slim-bookworm where a registry is reachable)" >&2
            exit 2; }
        # minbase + python3-venv: what the Dockerfiles need (python3.11, `python3 -m venv`,
        # useradd, apt-get).
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
        # The downloaded .debs and package lists (90 MB) would be in every image, and so would
        # documentation, man pages and translations; dpkg then keeps later installs from
        # adding them back (as Debian's own slim images do).
        rm -rf "$WORK/rootfs/var/cache/apt/archives/"*.deb "$WORK/rootfs/var/lib/apt/lists/"* \
            "$WORK/rootfs/usr/share/doc/"* "$WORK/rootfs/usr/share/man/"* \
            "$WORK/rootfs/usr/share/info/"* "$WORK/rootfs/usr/share/locale/"*
        printf '%s\n' 'path-exclude /usr/share/doc/*' 'path-include /usr/share/doc/*/copyright' \
            'path-exclude /usr/share/man/*' 'path-exclude /usr/share/info/*' \
            'path-exclude /usr/share/locale/*' >"$WORK/rootfs/etc/dpkg/dpkg.cfg.d/kasmina-minimal"
        tar -C "$WORK/rootfs" -c . | docker import - "$DEBIAN_BASE"
        rm -rf "$WORK/rootfs"
    fi
fi

step "build context"
mkdir -p "$WORK/context"
git ls-files -z --cached --others --exclude-standard \
    | grep -zv '^services/[^/]*/tests/' \
    | tar --null --ignore-failed-read -T - -c 2>/dev/null | tar -x -C "$WORK/context"
shopt -s nullglob
extras=(deploy/wheels/*.whl deploy/certs/*.crt)
if [ -n "${HOST_CA_DIR=/usr/local/share/ca-certificates}" ]; then
    for ca in "$HOST_CA_DIR"/*.crt; do cp "$ca" "$WORK/context/deploy/certs/"; done
fi
shopt -u nullglob
for f in "${extras[@]}"; do cp -l "$f" "$WORK/context/$f" 2>/dev/null || cp "$f" "$WORK/context/$f"; done
if ! ls "$WORK/context/deploy/wheels/"torch-2.13.0*.whl >/dev/null 2>&1; then
    wheel=${TORCH_WHEEL:-$(ls "${PIP_FIND_LINKS:-/opt/wheels}"/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)}
    if [ -n "$wheel" ]; then
        cp -l "$wheel" "$WORK/context/deploy/wheels/" 2>/dev/null || cp "$wheel" "$WORK/context/deploy/wheels/"
    elif [ -z "${GPU:-}" ]; then
        echo "build: no CPU torch wheel (deploy/wheels/, TORCH_WHEEL); the runtime image downloads torch==2.13.0" >&2
    fi
fi

build() { docker build --network host --build-arg "BASE_IMAGE=$BASE" "$@"; }
size() { echo "$1 $(docker image inspect -f '{{.Size}}' "$1" | numfmt --to=iec)"; }
if [ -z "${REDIS_IMAGE:-}" ]; then
    step "kasmina/redis:bookworm"
    build -f deploy/tools/Dockerfile --target redis -t kasmina/redis:bookworm deploy/tools
fi
if [ -z "${PROMETHEUS_IMAGE:-}" ]; then
    step "kasmina/prometheus:bookworm"
    build -f deploy/tools/Dockerfile --target prometheus -t kasmina/prometheus:bookworm deploy/tools
fi
for service in karn tamiyo kasmina; do
    name=$service args=()
    if [ "$service" = kasmina ] && [ -n "${GPU:-}" ]; then
        name=kasmina-cuda args=(--build-arg TORCH_SOURCE=index --build-arg KASMINA_EXTRAS=fleet,demo,triton)
    fi
    step "$PREFIX/$name:$TAG"
    build "${args[@]}" -f "$WORK/context/deploy/Dockerfile" --target "$service" \
        -t "$PREFIX/$name:$TAG" "$WORK/context"
done
step "images built"
for image in "${REDIS_IMAGE:-kasmina/redis:bookworm}" "${PROMETHEUS_IMAGE:-kasmina/prometheus:bookworm}" \
             "$PREFIX/karn:$TAG" "$PREFIX/tamiyo:$TAG" "$PREFIX/kasmina${GPU:+-cuda}:$TAG"; do
    docker image inspect "$image" >/dev/null 2>&1 && size "$image"
done
