#!/bin/sh
# Replicas made by `docker compose up --scale tamiyo=3` share one environment, but each member
# of a consumer group needs its own name (else two replicas would claim each other's pending
# messages as their own). Default the name to the container's hostname, unique per replica.
set -e
: "${TAMIYO_CONSUMER_NAME:=tamiyo-$(hostname)}"
: "${KARN_CONSUMER_NAME:=karn-$(hostname)}"
export TAMIYO_CONSUMER_NAME KARN_CONSUMER_NAME
exec "$@"
