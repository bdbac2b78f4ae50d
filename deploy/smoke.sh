#!/usr/bin/env bash
# End-to-end smoke test of deploy/ with no registry: build a Debian base with debootstrap,
# build the fleet's images on it, bring the stack up, submit a training job over gRPC, wait
# until its seed metrics are in Prometheus's HTTP API, tear everything down.
#
#   sudo deploy/smoke.sh            # from the repository root; needs dockerd running, debootstrap,
#                                   # docker-compose (v1) or `docker compose` (v2)
#
# The daemon this was written for runs `dockerd --storage-driver=vfs --iptables=false
# --bridge=none`: containers use the host network, so the compose file is rewritten by
# deploy/smoke/hostnet.py (same services, commands, health checks; host wiring). Grafana is not
# in Debian, so it runs only when GRAFANA_IMAGE names an image the daemon already has.
# Environment: SMOKE_EPOCHS (20), SMOKE_TIMEOUT_S (300), SMOKE_TORCH_WHEEL (a torch 2.13.0
# CPU wheel; default: the one in pip's find-links), SMOKE_KEEP=1 leaves the stack up.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
BASE=kasmina-smoke/debian-python:bookworm
TAG=smoke
PROJECT=kasmina-smoke
WORK=$(mktemp -d /tmp/kasmina-smoke.XXXXXX)
EPOCHS=${SMOKE_EPOCHS:-20}
TIMEOUT_S=${SMOKE_TIMEOUT_S:-300}
PYTHON=${PYTHON:-python3}
JOB="smoke-$(date +%s)"
step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }

if docker compose version >/dev/null 2>&1; then COMPOSE=(docker compose); else COMPOSE=(docker-compose); fi
docker info >/dev/null || { echo "smoke: no Docker daemon (see the header of $0)" >&2; exit 2; }

step "base image $BASE"
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
    # minbase + python3-venv: what the Dockerfile needs (python3.11, `python3 -m venv`, useradd).
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
        bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
    tar -C "$WORK/rootfs" -c . | docker import - "$BASE"
    rm -rf "$WORK/rootfs"
fi

step "build context"
# Tracked and untracked-but-not-ignored files only: the legacy builder ignores
# deploy/Dockerfile.dockerignore and would otherwise send .venv and runs/ (gigabytes).
mkdir -p "$WORK/context"
git ls-files -z --cached --others --exclude-standard \
    | grep -zv '^services/[^/]*/tests/' | tar --null -T - -c | tar -x -C "$WORK/context"
wheel=${SMOKE_TORCH_WHEEL:-$(ls "${PIP_FIND_LINKS:-/opt/wheels}"/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n1 || true)}
if [ -n "$wheel" ]; then cp "$wheel" "$WORK/context/deploy/wheels/"; else
    echo "smoke: no CPU torch wheel found; the kasmina image will download torch==2.13.0" >&2; fi

# This host reaches PyPI through a TLS-inspecting proxy: give the images the CAs it trusts.
cp "${SMOKE_EXTRA_CA_DIR:-/usr/local/share/ca-certificates}"/*.crt "$WORK/context/deploy/certs/" 2>/dev/null || true

step "images"
# The legacy builder: BuildKit needs the buildx plugin, which is not installed here, and the
# filtered context above already does what the dockerignore file would.
export DOCKER_BUILDKIT=${DOCKER_BUILDKIT:-0}
build() { docker build --network host --build-arg "BASE_IMAGE=$BASE" "$@"; }
build -f deploy/smoke/Dockerfile.tools --target redis -t kasmina-smoke/redis:$TAG deploy/smoke
build -f deploy/smoke/Dockerfile.tools --target prometheus -t kasmina-smoke/prometheus:$TAG deploy/smoke
for service in karn tamiyo kasmina; do
    build -f "$WORK/context/deploy/Dockerfile" --target $service -t "kasmina/$service:$TAG" "$WORK/context"
    echo "kasmina/$service:$TAG $(docker image inspect -f '{{.Size}}' kasmina/$service:$TAG | numfmt --to=iec)"
done
docker run --rm --entrypoint python kasmina/karn:$TAG -c \
    "import importlib.util as u; print('torch in karn image:', u.find_spec('torch') is not None)"

step "compose file for host networking"
without=()
[ -n "${GRAFANA_IMAGE:-}" ] || { without=(--without grafana); echo "grafana: skipped (no image; not in Debian)"; }
"$PYTHON" deploy/smoke/hostnet.py "$WORK/compose" "${without[@]}"
export IMAGE_TAG=$TAG REDIS_IMAGE=kasmina-smoke/redis:$TAG PROMETHEUS_IMAGE=kasmina-smoke/prometheus:$TAG
# digits epochs take a fraction of a second: let Tamiyo decide quickly (as `kasmina fleet` does)
# and germinate at the first epoch boundary, so seeds leave DORMANT within the short job.
export TAMIYO_TICK_S=0.1 TAMIYO_REPORT_GRACE_S=0.2 TAMIYO_MIN_DELTA=100 TAMIYO_PLATEAU_EPOCHS=1
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$WORK/compose/docker-compose.yml" "$@"; }
teardown() {
    if [ "${SMOKE_KEEP:-0}" = 1 ]; then echo "left up: ${COMPOSE[*]} -p $PROJECT -f $WORK/compose/docker-compose.yml down -v"; return; fi
    step "teardown"
    compose logs --no-color >"$WORK/compose.log" 2>&1 || true
    compose down -v --remove-orphans || true
    echo "service logs: $WORK/compose.log"
}
trap teardown EXIT

step "up (waits for each health check in order)"
compose up -d --no-build
compose ps

step "submit job $JOB over gRPC ($EPOCHS epochs)"
compose exec -T kasmina python -m kasmina submit --job-id "$JOB" --epochs "$EPOCHS"

step "seed metrics in Prometheus"
"$PYTHON" - "$JOB" "$TIMEOUT_S" <<'EOF'
import json, sys, time, urllib.parse, urllib.request
job, timeout = sys.argv[1], float(sys.argv[2])
def query(q):
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)["data"]["result"]
deadline = time.monotonic() + timeout
while not (seeds := query(f'kasmina_seeds{{job_id="{job}"}}')):
    if time.monotonic() > deadline:
        sys.exit(f"no kasmina_seeds series for {job} in Prometheus after {timeout:.0f} s")
    time.sleep(2)
by_stage = {}
for s in seeds:
    by_stage[s["metric"]["stage"]] = by_stage.get(s["metric"]["stage"], 0) + int(float(s["value"][1]))
print(f"kasmina_seeds{{job_id={job}}}: {len(seeds)} series; seeds by stage now: {by_stage}")
grown = query(f'max by (stage) (max_over_time(kasmina_seeds{{job_id="{job}", stage!="DORMANT"}}[30m])) > 0')
print("stages seeds reached during the job:", {r["metric"]["stage"]: r["value"][1] for r in grown})
if not grown:
    sys.exit("no seed left DORMANT: Tamiyo's commands did not reach the runtime")
print("targets up:", {r["metric"]["job"]: r["value"][1] for r in query("up")})
print("tamiyo decisions:", {r["metric"]["kind"]: r["value"][1] for r in query("tamiyo_decisions_total")})
print("karn outcomes:", {r["metric"]["outcome"]: r["value"][1] for r in query("karn_field_reports_stored_total")})
EOF
step "smoke passed"
