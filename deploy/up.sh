#!/usr/bin/env bash
# `make up`: build every image (deploy/build.sh: offline, from a local Debian base), start the
# stack, wait until every container is healthy, and say what runs where.
#
#   deploy/up.sh        # env: COMPOSE ("docker compose" or docker-compose; found when unset),
#                       # GPU=1 (adds docker-compose.gpu.yml), GRAFANA_IMAGE, and deploy/build.sh's
#
# Grafana starts only when the daemon already has GRAFANA_IMAGE and its admin password secret
# exists (deploy/secrets/README.md); otherwise the rest starts and one line says why not.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
if [ -n "${COMPOSE:-}" ]; then
    read -r -a compose <<<"$COMPOSE"
elif docker compose version >/dev/null 2>&1; then
    compose=(docker compose)
elif command -v docker-compose >/dev/null; then
    compose=(docker-compose)
else
    echo "up: neither \`docker compose\` nor docker-compose is installed" >&2; exit 2
fi
files=(-f deploy/docker-compose.yml)
if [ -n "${GPU:-}" ]; then files+=(-f deploy/docker-compose.gpu.yml); fi
# Creating and removing containers on the vfs storage driver outlasts compose v1's 60 s default.
export COMPOSE_HTTP_TIMEOUT=${COMPOSE_HTTP_TIMEOUT:-600}
WAIT_S=${UP_WAIT_S:-300}

deploy/build.sh

# The fleet's secrets (deploy/secrets/README.md): any that is missing is made, random, once.
for name in oona_signing_key kasmina_api_token karn_api_token tamiyo_api_token \
            redis_kasmina_password redis_tamiyo_password redis_karn_password redis_admin_password; do
    file=deploy/secrets/$name
    if [ ! -s "$file" ]; then
        (umask 077; python3 -c "import secrets; print(secrets.token_hex(32))" > "$file")
        chmod 0644 "$file"  # read by the container's own user
        echo "up: made $file (random; keep it, every service of the fleet shares it)"
    fi
done
# Empty unless a signing key rotation is under way (docs/security.md).
if [ ! -e deploy/secrets/oona_signing_previous_keys ]; then
    (umask 077; : > deploy/secrets/oona_signing_previous_keys)
    chmod 0644 deploy/secrets/oona_signing_previous_keys
fi
# Redis's ACL users, one per service with least privilege (oona.acl), rendered by the fleet's
# own image from the password files (only their SHA-256 lands in the file); remade every time,
# so a changed password or a new rule takes effect at the next `make up`.
mounts=()
for user in kasmina tamiyo karn admin; do
    mounts+=(-v "$ROOT/deploy/secrets/redis_${user}_password:/secrets/redis_${user}_password:ro")
done
(umask 077; docker run --rm --network none "${mounts[@]}" \
    "${IMAGE_PREFIX:-kasmina}/karn:${IMAGE_TAG:-latest}" \
    python -m oona.acl --passwords-dir /secrets > deploy/secrets/redis_users_acl.new)
mv deploy/secrets/redis_users_acl.new deploy/secrets/redis_users_acl
chmod 0644 deploy/secrets/redis_users_acl  # read by redis-server in its container

grafana_image=${GRAFANA_IMAGE:-grafana/grafana:11.1.0}
secret=${GRAFANA_ADMIN_PASSWORD_FILE:-./secrets/grafana_admin_password}
case $secret in /*) ;; *) secret=deploy/$secret ;; esac  # compose reads it relative to deploy/
profile=()
# Never pulled here: where no registry is reachable a pull only waits for its timeout.
if ! docker image inspect "$grafana_image" >/dev/null 2>&1; then
    grafana="grafana: NOT started: the daemon has no image $grafana_image (Debian has no Grafana package: docker pull or docker load it, or set GRAFANA_IMAGE; deploy/README.md)"
elif [ ! -s "$secret" ]; then
    grafana="grafana: NOT started: no admin password in $secret (deploy/secrets/README.md)"
else
    profile=(--profile grafana)
    grafana="grafana: http://127.0.0.1:${GRAFANA_PUBLISH:-3000} (user admin, password in $secret)"
fi

echo "== up (${compose[*]})"
"${compose[@]}" "${files[@]}" "${profile[@]}" up -d --no-build --remove-orphans

echo "== waiting for health checks (up to ${WAIT_S}s)"
deadline=$((SECONDS + WAIT_S))
while :; do
    states=$("${compose[@]}" "${files[@]}" "${profile[@]}" ps -q | xargs -r docker inspect \
        -f '{{.Name}} {{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}')
    if ! grep -qv ' healthy$' <<<"$states"; then break; fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "$states" | sed 's/^\//  /'
        echo "up: not every service is healthy after ${WAIT_S}s; logs: ${compose[*]} ${files[*]} logs" >&2
        exit 1
    fi
    sleep 3
done
echo "$states" | sed 's/^\//  /'
echo "prometheus: http://127.0.0.1:${PROMETHEUS_PUBLISH:-9090}"
echo "kasmina gRPC: 127.0.0.1:${KASMINA_GRPC_PUBLISH:-50051}"
echo "$grafana"
