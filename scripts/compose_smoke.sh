#!/usr/bin/env bash
# docker-compose, for real: build both images, run 2 encoder replicas and the decoder, caption
# videos through the decoder's published port (bound to 127.0.0.1), check that both encoder
# replicas served work, then take the stack down.
#
#   scripts/compose_smoke.sh [VIDEO]          # default samples/orbit.mp4 (in this repository)
#
# Run as root on a machine without Docker it installs what it needs first (Debian's
# docker.io, docker-compose 1.29 and debootstrap) and starts dockerd. Without a registry it
# builds the base image pllava-base:bookworm with docker/build-base-image.sh; set
# BASE_IMAGE=python:3.11-slim to use the public one instead. The host's locally added CA
# certificates are copied into docker/extra-ca/ (git-ignored) so pip inside the build
# trusts the same TLS-inspecting proxy the host does.
#
# Environment: BASE_IMAGE, PLLAVA_MODEL_DIR (default models/tiny, made if absent),
# PLLAVA_PORT (default: a free port), COMPOSE (default: `docker compose` if present, else
# docker-compose), ENCODERS (default 2), SMOKE_PROJECT (default pllava-smoke).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
VIDEO=${1:-$REPO/samples/orbit.mp4}
ENCODERS=${ENCODERS:-2}
PROJECT=${SMOKE_PROJECT:-pllava-smoke}
export BASE_IMAGE=${BASE_IMAGE:-pllava-base:bookworm}
export PLLAVA_MODEL_DIR=${PLLAVA_MODEL_DIR:-$REPO/models/tiny}

step() { printf '\n==> %s\n' "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The project's tools: from the venv if there is one, else from PATH.
if [[ -x $REPO/.venv/bin/python ]]; then
    PY=$REPO/.venv/bin/python
    BIN=$REPO/.venv/bin/
else
    PY=$(command -v python3)
    BIN=
fi

# --- Docker engine and compose ----------------------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
    step "installing docker.io docker-compose debootstrap"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    step "starting dockerd (log: /tmp/pllava-dockerd.log)"
    nohup dockerd >/tmp/pllava-dockerd.log 2>&1 &
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -20 /tmp/pllava-dockerd.log; echo "dockerd did not start" >&2; exit 1; }
fi
if [[ -z ${COMPOSE:-} ]]; then
    if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE=docker-compose; fi
fi
echo "compose: $($COMPOSE version 2>/dev/null | head -n 1)"

# --- Inputs: base image, extra CAs, model ------------------------------------------------
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    if [[ $BASE_IMAGE == pllava-base:* ]]; then
        step "building the base image $BASE_IMAGE"
        t=$(now); docker/build-base-image.sh "$BASE_IMAGE"; echo "base image built in $(since "$t") s"
    else
        step "pulling $BASE_IMAGE"
        docker pull "$BASE_IMAGE"
    fi
fi

copied=0
for cert in /usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt; do
    [[ -f $cert ]] || continue
    cmp -s "$cert" "docker/extra-ca/$(basename "$cert")" || cp "$cert" docker/extra-ca/
    copied=$((copied + 1))
done
echo "extra CA certificates for the build: $copied (from /usr/local/share/ca-certificates)"

if [[ ! -f $PLLAVA_MODEL_DIR/config.json ]]; then
    step "making the tiny checkpoint in $PLLAVA_MODEL_DIR"
    "${BIN}pllava" make-tiny "$PLLAVA_MODEL_DIR"
fi

if [[ -z ${PLLAVA_PORT:-} ]]; then
    PLLAVA_PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export PLLAVA_PORT

# The smoke run switches the decoder's visual-token cache off, so repeated videos still go
# to the encoders and round robin has calls to spread.
OVERRIDE=$(mktemp /tmp/pllava-smoke-override.XXXXXX.yml)
cat >"$OVERRIDE" <<'EOF'
version: "2.4"
services:
  decoder:
    environment:
      PLLAVA_DECODER_VISUAL_CACHE_BYTES: "0"
EOF
COMPOSE_ARGS=(-p "$PROJECT" -f docker-compose.yml -f "$OVERRIDE")
compose() { $COMPOSE "${COMPOSE_ARGS[@]}" "$@"; }

cleanup() {
    local status=$?
    if [[ $status -ne 0 ]]; then
        step "failed; the services' last log lines"
        compose logs --no-color --tail 40 2>&1 || true
    fi
    step "down"
    compose down --volumes --remove-orphans --timeout 20 || true
    rm -f "$OVERRIDE"
    exit $status
}
trap cleanup EXIT

# --- Build, run, caption ------------------------------------------------------------------
step "build (BASE_IMAGE=$BASE_IMAGE)"
t=$(now); compose build; echo "images built in $(since "$t") s"

step "up --scale encoder=$ENCODERS (decoder on 127.0.0.1:$PLLAVA_PORT)"
t=$(now)
compose up -d --scale encoder="$ENCODERS"
for _ in $(seq 600); do
    "$PY" -m pllava_client.health "127.0.0.1:$PLLAVA_PORT" --timeout 2 >/dev/null 2>&1 && break
    sleep 1
done
"$PY" -m pllava_client.health "127.0.0.1:$PLLAVA_PORT" --timeout 5
echo "stack serving in $(since "$t") s"

step "caption $(basename "$VIDEO") through 127.0.0.1:$PLLAVA_PORT"
t=$(now)
"${BIN}pllava-caption" "$VIDEO" --server "127.0.0.1:$PLLAVA_PORT" --max-new-tokens 24 --timeout 300
echo "captioned in $(since "$t") s"
# More calls, so round robin has something to spread over the replicas.
for i in $(seq $((2 * ENCODERS - 1))); do
    "${BIN}pllava-caption" "$VIDEO" --server "127.0.0.1:$PLLAVA_PORT" --max-new-tokens 4 --timeout 300 --json >/dev/null
done

step "work done by each encoder replica"
served=0
replicas=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" \
                      --filter "label=com.docker.compose.service=encoder")
for id in $replicas; do
    name=$(docker inspect --format '{{.Name}}' "$id")
    # the encoder logs one line per request: "<request>: N frames -> (V, D) visual tokens (decode ...)"
    n=$(docker logs "$id" 2>&1 | grep -cE 'frames -> .*visual tokens \(decode' || true)
    echo "${name#/}: $n videos encoded"
    [[ $n -gt 0 ]] && served=$((served + 1))
done
echo "encoder replicas that served work: $served of $(echo "$replicas" | wc -w)"
if [[ $served -lt $ENCODERS ]]; then
    echo "not every encoder replica served work" >&2
    exit 1
fi
echo "compose smoke test passed"
