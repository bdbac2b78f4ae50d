#!/usr/bin/env bash
# End-to-end check of deploy/ as `make up` runs it, with no image registry:
#
#   sudo deploy/smoke.sh     # from anywhere; needs dockerd running, debootstrap (for the base
#                            # image, once), docker-compose (v1) or `docker compose` (v2)
#
# deploy/up.sh builds every image (deploy/build.sh) and starts the real compose file, on the
# compose network, as the project `kasmina-smoke` on its own host ports. It passes only when:
# every container is healthy; Prometheus has scraped karn, tamiyo and kasmina; a digits job
# submitted over gRPC grows seeds (Tamiyo's commands reached the runtime); and a message no
# handler can decode, written to the field-report stream, is dead-lettered, fires the
# DeadLettersGrowing alert on that first dead letter, and is listed by the alert's runbook
# command. Then everything is torn down (volumes too).
# Environment: SMOKE_EPOCHS (20), SMOKE_TIMEOUT_S (300), SMOKE_KEEP=1 leaves the stack up, and
# deploy/up.sh's and deploy/build.sh's variables.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export COMPOSE_PROJECT_NAME=kasmina-smoke
export PROMETHEUS_PUBLISH=${PROMETHEUS_PUBLISH:-19090} KASMINA_GRPC_PUBLISH=${KASMINA_GRPC_PUBLISH:-15051} \
    GRAFANA_PUBLISH=${GRAFANA_PUBLISH:-13000}
export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-600}
EPOCHS=${SMOKE_EPOCHS:-20}
TIMEOUT_S=${SMOKE_TIMEOUT_S:-300}
PYTHON=${PYTHON:-python3}
JOB="smoke-$(date +%s)"
step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }
if [ -n "${COMPOSE:-}" ]; then read -r -a cli <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then cli=(docker compose); else cli=(docker-compose); fi
export COMPOSE="${cli[*]}"
compose() { "${cli[@]}" -f deploy/docker-compose.yml --profile grafana "$@"; }

# The fleet runs signed and authenticated: `make up` (deploy/up.sh) makes the secrets it lacks.
# digits epochs take a fraction of a second: let Tamiyo decide quickly (as `kasmina fleet` does)
# and germinate at the first epoch boundary, so seeds leave DORMANT within the short job.
export TAMIYO_TICK_S=0.1 TAMIYO_REPORT_GRACE_S=0.2 TAMIYO_MIN_DELTA=100 TAMIYO_PLATEAU_EPOCHS=1
teardown() {
    if [ "${SMOKE_KEEP:-0}" = 1 ]; then
        echo "left up: COMPOSE_PROJECT_NAME=$COMPOSE_PROJECT_NAME make down"; return; fi
    step "teardown"
    log=$(mktemp /tmp/kasmina-smoke-compose.XXXXXX.log)
    compose logs --no-color >"$log" 2>&1 || true
    compose down -v --remove-orphans || true
    echo "service logs: $log"
}
trap teardown EXIT

step "build and up (deploy/up.sh)"
deploy/up.sh

prom() { "$PYTHON" - "$PROMETHEUS_PUBLISH" "$@"; }
step "Prometheus scrapes every service"
prom "$TIMEOUT_S" <<'EOF'
import json, sys, time, urllib.parse, urllib.request
port, timeout = sys.argv[1], float(sys.argv[2])
def query(q):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.load(reply)["data"]["result"]
want = {"kasmina", "tamiyo", "karn", "prometheus"}
deadline = time.monotonic() + timeout
while True:
    try:
        up = {r["metric"]["job"] for r in query("up == 1")}
    except OSError:
        up = set()
    if want <= up:
        break
    if time.monotonic() > deadline:
        sys.exit(f"Prometheus has not scraped {sorted(want - up)} after {timeout:.0f} s")
    time.sleep(2)
print("scraped:", sorted(up))
EOF

step "submit job $JOB over gRPC ($EPOCHS epochs)"
compose exec -T kasmina python -m kasmina submit --job-id "$JOB" --epochs "$EPOCHS"

step "seed metrics in Prometheus"
prom "$JOB" "$TIMEOUT_S" <<'EOF'
import json, sys, time, urllib.parse, urllib.request
port, job, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
def query(q):
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
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
print("tamiyo decisions:", {r["metric"]["kind"]: r["value"][1] for r in query("tamiyo_decisions_total")})
print("karn outcomes:", {r["metric"]["outcome"]: r["value"][1] for r in query("karn_field_reports_stored_total")})
EOF

step "a first dead letter fires DeadLettersGrowing"
# Not an Envelope: Karn's consumer dead-letters it as `undecodable`.
compose exec -T redis sh -c 'REDISCLI_AUTH=$(cat /run/secrets/redis_admin_password) \
  redis-cli --user admin XADD innovation.field_reports "*" smoke not-an-envelope'
prom "$TIMEOUT_S" <<'EOF'
import json, sys, time, urllib.request
port, timeout = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + timeout
while True:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/alerts", timeout=5) as reply:
        alerts = json.load(reply)["data"]["alerts"]
    firing = [a for a in alerts if a["labels"]["alertname"] == "DeadLettersGrowing"
              and a["state"] == "firing"]
    if firing:
        print("firing:", firing[0]["labels"], "\n ", firing[0]["annotations"]["description"])
        break
    if time.monotonic() > deadline:
        sys.exit(f"DeadLettersGrowing not firing after {timeout:.0f} s; alerts: {alerts}")
    time.sleep(3)
EOF
step "the alert's runbook command lists it"
letters=$(compose exec -T karn python -m oona dlq list innovation.field_reports)
echo "$letters"
grep -q undecodable <<<"$letters" || { echo "smoke: the runbook command listed no dead letter" >&2; exit 1; }
step "smoke passed"
