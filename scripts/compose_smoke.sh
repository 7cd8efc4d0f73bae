#!/usr/bin/env bash
# docker-compose, for real: build the image (one image, docker/Dockerfile, for every server),
# run 2 encoder replicas, the decoder and the OpenAI-compatible front end, caption a video
# through the decoder's published port (bound to 127.0.0.1) and once through the front end's,
# check that no container runs as root, that both encoder replicas served work and that the
# decoder's published metrics counted every caption; then (unless SMOKE_TLS=0) bring the stack up again secured by
# docker-compose.tls.yml with certificates from `pllava make-certs`, caption over mutual TLS
# with the token on both hops, check that a plaintext client, a missing or wrong token and an
# OpenAI request without the key are refused, then take it all down.
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
# It cleans up after itself, also when it fails: the stack (containers, network), the image it
# built (tagged $PLLAVA_IMAGE, pllava-serve:smoke by default, so a pllava-serve:latest of yours
# is never touched), the base image if it built it, the CA copies and the tiny checkpoint if it
# made them, and the dockerd if it started one. What stays: the apt packages it installed and
# Docker's state folder /var/lib/docker (with Compose v2/BuildKit, also its build cache:
# `docker builder prune`). SMOKE_KEEP_IMAGES=1 keeps both images, so a rerun builds from
# cache in seconds instead of minutes; SMOKE_KEEP_DOCKERD=1 leaves a dockerd it started running.
#
# Environment: BASE_IMAGE, PLLAVA_IMAGE, PLLAVA_MODEL_DIR (default models/tiny, made if absent),
# PLLAVA_PORT, PLLAVA_API_PORT and PLLAVA_METRICS_PORT (default: free ports), COMPOSE
# (default: `docker compose` if present, else docker-compose), ENCODERS (default 2),
# SMOKE_PROJECT (default pllava-smoke), SMOKE_TLS (default 1: also run the secured stack),
# SMOKE_KEEP_IMAGES, SMOKE_KEEP_DOCKERD.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
VIDEO=${1:-$REPO/samples/orbit.mp4}
[[ -f $VIDEO ]] || { echo "compose smoke: no video at $VIDEO" >&2; exit 2; }
ENCODERS=${ENCODERS:-2}
PROJECT=${SMOKE_PROJECT:-pllava-smoke}
export BASE_IMAGE=${BASE_IMAGE:-pllava-base:bookworm}
export PLLAVA_IMAGE=${PLLAVA_IMAGE:-pllava-serve:smoke}
export PLLAVA_MODEL_DIR=${PLLAVA_MODEL_DIR:-$REPO/models/tiny}
KEEP_IMAGES=${SMOKE_KEEP_IMAGES:-0}
KEEP_DOCKERD=${SMOKE_KEEP_DOCKERD:-0}
TLS=${SMOKE_TLS:-1}
DOCKERD_LOG=/tmp/pllava-dockerd.log

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

# --- What this run made; cleanup() takes it away again --------------------------------------
DOCKERD_PID=
BUILT_BASE=0
MADE_MODEL=                  # the topmost folder this run created for the tiny checkpoint
COPIED_CAS=()
OVERRIDE=
CERTS=
STACK=0
OLD_IMAGE_ID=

image_id() { docker image inspect --format '{{.Id}}' "$1" 2>/dev/null || true; }

cleanup() {
    local status=$? left
    set +e
    if [[ $STACK == 1 ]]; then
        if [[ $status -ne 0 ]]; then
            step "failed; the services' last log lines"
            compose logs --no-color --tail 40 2>&1
        fi
        step "down"
        compose down --volumes --remove-orphans --timeout 20
        left=$(docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" | wc -l)
        echo "cleanup: containers of project $PROJECT left: $left"
        [[ $left -eq 0 ]] || status=1
    fi
    [[ -n $OVERRIDE ]] && rm -f "$OVERRIDE"
    [[ -n $CERTS ]] && rm -rf "$CERTS"
    step "cleanup"
    # A rebuild over a kept image leaves the old one untagged: it is garbage either way.
    if [[ -n $OLD_IMAGE_ID && $OLD_IMAGE_ID != "$(image_id "$PLLAVA_IMAGE")" ]] \
            && [[ $(docker image inspect --format '{{len .RepoTags}}' "$OLD_IMAGE_ID" 2>/dev/null) == 0 ]]; then
        docker image rm "$OLD_IMAGE_ID" >/dev/null && echo "cleanup: removed the replaced image $OLD_IMAGE_ID"
    fi
    if [[ $KEEP_IMAGES == 1 ]]; then
        echo "cleanup: kept the image $PLLAVA_IMAGE and the base $BASE_IMAGE (SMOKE_KEEP_IMAGES=1)"
    elif docker info >/dev/null 2>&1; then
        local images=("$PLLAVA_IMAGE")
        [[ $BUILT_BASE == 1 ]] && images+=("$BASE_IMAGE")
        for image in "${images[@]}"; do
            if [[ -n $(image_id "$image") ]]; then
                docker image rm "$image" >/dev/null && echo "cleanup: removed the image $image"
            fi
            if [[ -n $(image_id "$image") ]]; then
                echo "cleanup: the image $image is still there" >&2
                status=1
            fi
        done
    fi
    for cert in "${COPIED_CAS[@]}"; do rm -f "$cert"; done
    [[ ${#COPIED_CAS[@]} -gt 0 ]] && echo "cleanup: removed ${#COPIED_CAS[@]} CA certificate copies from docker/extra-ca/"
    if [[ -n $MADE_MODEL ]]; then
        rm -rf "$MADE_MODEL" && echo "cleanup: removed $MADE_MODEL (the tiny checkpoint this run made)"
    fi
    if [[ -n $DOCKERD_PID ]]; then
        if [[ $KEEP_DOCKERD == 1 ]]; then
            echo "cleanup: left the dockerd this run started running (pid $DOCKERD_PID, SMOKE_KEEP_DOCKERD=1)"
        else
            kill -TERM "$DOCKERD_PID" 2>/dev/null
            for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
            if kill -0 "$DOCKERD_PID" 2>/dev/null; then
                echo "cleanup: the dockerd this run started (pid $DOCKERD_PID) did not stop" >&2
                status=1
            else
                echo "cleanup: stopped the dockerd this run started (pid $DOCKERD_PID)"
                [[ $status -eq 0 ]] && rm -f "$DOCKERD_LOG"
            fi
        fi
    fi
    exit $status
}
trap cleanup EXIT

# --- Docker engine and compose ----------------------------------------------------------
# Only what is missing: Debian's docker.io conflicts with Docker CE's packages, so a host with
# Docker (and Compose v2) gets nothing installed, and debootstrap only when it builds the base.
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
if ! command -v docker-compose >/dev/null && ! { command -v docker >/dev/null && docker compose version >/dev/null 2>&1; }; then
    missing+=(docker-compose)
fi
if [[ $BASE_IMAGE == pllava-base:* ]] && ! command -v debootstrap >/dev/null; then missing+=(debootstrap); fi
if (( ${#missing[@]} )); then
    step "installing ${missing[*]} (they stay installed)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
    step "starting dockerd (log: $DOCKERD_LOG; stopped again at the end)"
    nohup dockerd >"$DOCKERD_LOG" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 120); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
    docker info >/dev/null 2>&1 || { tail -20 "$DOCKERD_LOG"; echo "dockerd did not start" >&2; exit 1; }
fi
if [[ -z ${COMPOSE:-} ]]; then
    if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE=docker-compose; fi
fi
echo "compose: $($COMPOSE version 2>/dev/null | head -n 1)"

# --- Inputs: base image, extra CAs, model ------------------------------------------------
if [[ -z $(image_id "$BASE_IMAGE") ]]; then
    if [[ $BASE_IMAGE == pllava-base:* ]]; then
        step "building the base image $BASE_IMAGE"
        BUILT_BASE=1
        t=$(now); docker/build-base-image.sh "$BASE_IMAGE"; echo "base image built in $(since "$t") s"
    else
        step "pulling $BASE_IMAGE"
        docker pull "$BASE_IMAGE"
    fi
fi

found=0
for cert in /usr/local/share/ca-certificates/*.crt /usr/local/share/ca-certificates/*/*.crt; do
    [[ -f $cert ]] || continue
    found=$((found + 1))
    copy=docker/extra-ca/$(basename "$cert")
    [[ -e $copy ]] && continue   # the user's own copy (or one kept from before): not ours to remove
    cp "$cert" "$copy"
    COPIED_CAS+=("$copy")
done
echo "extra CA certificates for the build: $found (from /usr/local/share/ca-certificates)"

if [[ ! -f $PLLAVA_MODEL_DIR/config.json ]]; then
    step "making the tiny checkpoint in $PLLAVA_MODEL_DIR"
    if [[ ! -e $PLLAVA_MODEL_DIR ]]; then
        MADE_MODEL=$PLLAVA_MODEL_DIR
        while [[ ! -e $(dirname "$MADE_MODEL") ]]; do MADE_MODEL=$(dirname "$MADE_MODEL"); done
    fi
    "${BIN}pllava" make-tiny "$PLLAVA_MODEL_DIR"
fi

# Published ports come from below the kernel's ephemeral range (where port 0 binds land), so
# the servers the tests start beside this run never get one of them between `down` and `up`.
free_port() { "$PY" - <<'PY'
import random, socket
low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
for port in random.sample(range(20000, low), 200):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(port)
        break
PY
}
PLLAVA_PORT=${PLLAVA_PORT:-$(free_port)}
PLLAVA_API_PORT=${PLLAVA_API_PORT:-$(free_port)}
PLLAVA_METRICS_PORT=${PLLAVA_METRICS_PORT:-$(free_port)}
export PLLAVA_PORT PLLAVA_API_PORT PLLAVA_METRICS_PORT

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

wait_healthy() {  # wait_healthy [TLS FLAGS...]: until the decoder reports SERVING (10 minutes at most)
    for _ in $(seq 600); do
        "$PY" -m pllava_client.health "127.0.0.1:$PLLAVA_PORT" "$@" --timeout 2 >/dev/null 2>&1 && break
        sleep 1
    done
    "$PY" -m pllava_client.health "127.0.0.1:$PLLAVA_PORT" "$@" --timeout 5
}

check_replicas() {  # check_replicas N: each of the N encoder containers logged an encoded video
    local served=0 id name n replicas
    step "work done by each encoder replica"
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
    if [[ $served -lt $1 ]]; then
        echo "not every encoder replica served work" >&2
        exit 1
    fi
}

check_not_root() {  # every container of the project runs as some user other than root
    local id name uid
    for id in $(docker ps -q --filter "label=com.docker.compose.project=$PROJECT"); do
        name=$(docker inspect --format '{{.Name}}' "$id")
        uid=$(docker exec "$id" id -u)
        echo "${name#/} runs as uid $uid"
        [[ $uid != 0 ]] || { echo "${name#/} runs as root" >&2; exit 1; }
    done
}

# --- Build, run, caption ------------------------------------------------------------------
step "build $PLLAVA_IMAGE, one image for both services (BASE_IMAGE=$BASE_IMAGE)"
OLD_IMAGE_ID=$(image_id "$PLLAVA_IMAGE")
STACK=1
t=$(now); compose build; echo "image built in $(since "$t") s"
echo "image $PLLAVA_IMAGE: $(docker image inspect --format '{{.Size}}' "$PLLAVA_IMAGE" | awk '{ printf "%.2f GB", $1 / 1e9 }')"

step "up --scale encoder=$ENCODERS (decoder on 127.0.0.1:$PLLAVA_PORT)"
t=$(now)
compose up -d --scale encoder="$ENCODERS"
wait_healthy
echo "stack serving in $(since "$t") s"
images=$(docker ps --filter "label=com.docker.compose.project=$PROJECT" --format '{{.Image}}' | sort -u)
echo "images of the running containers: $(echo $images)"
[[ $images == "$PLLAVA_IMAGE" ]] || { echo "expected every container to run $PLLAVA_IMAGE" >&2; exit 1; }
check_not_root

step "caption $(basename "$VIDEO") through 127.0.0.1:$PLLAVA_PORT"
t=$(now)
"${BIN}pllava-caption" "$VIDEO" --server "127.0.0.1:$PLLAVA_PORT" --max-new-tokens 24 --timeout 300
echo "captioned in $(since "$t") s"
# More calls, so round robin has something to spread over the replicas.
for i in $(seq $((2 * ENCODERS - 1))); do
    "${BIN}pllava-caption" "$VIDEO" --server "127.0.0.1:$PLLAVA_PORT" --max-new-tokens 4 --timeout 300 --json >/dev/null
done

step "caption $(basename "$VIDEO") through the OpenAI-compatible API at 127.0.0.1:$PLLAVA_API_PORT"
t=$(now)
"$PY" - "$VIDEO" "http://127.0.0.1:$PLLAVA_API_PORT" <<'PY'
import base64, json, sys, time, urllib.error, urllib.request

video, base = sys.argv[1], sys.argv[2]
for _ in range(120):  # the front end answers /health with 200 once it reaches the decoder
    try:
        urllib.request.urlopen(base + "/health", timeout=5).close()
        break
    except (urllib.error.URLError, OSError):
        time.sleep(1)
model = json.load(urllib.request.urlopen(base + "/v1/models", timeout=30))["data"][0]["id"]
url = "data:video/mp4;base64," + base64.b64encode(open(video, "rb").read()).decode()
body = {"model": model, "max_tokens": 8, "messages": [{"role": "user", "content": [
    {"type": "text", "text": "What happens?"}, {"type": "video_url", "video_url": {"url": url}}]}]}
request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
answer = json.load(urllib.request.urlopen(request, timeout=300))
print(f"OpenAI-compatible API answered: model {answer['model']}, "
      f"{answer['usage']['completion_tokens']} completion tokens")
PY
echo "captioned in $(since "$t") s"

step "the decoder's metrics at http://127.0.0.1:$PLLAVA_METRICS_PORT/metrics"
# Every caption above counted: 2 x ENCODERS through the decoder's port, one through the front end.
"$PY" - "$PLLAVA_METRICS_PORT" "$((2 * ENCODERS + 1))" <<'PY'
import re, sys, urllib.request
port, captions = sys.argv[1], int(sys.argv[2])
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
def value(pattern):
    m = re.search(r"^" + pattern + r" (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0
ok = value(r'pllava_grpc_server_handled_total\{(?=[^}]*grpc_code="OK")(?=[^}]*grpc_method="Caption")[^}]*\}')
ttft = value("pllava_decoder_time_to_first_token_seconds_count")
print(f"captions OK: {ok:g}, first tokens: {ttft:g} (expected {captions})")
sys.exit(0 if ok == ttft == captions else 1)
PY

check_replicas "$ENCODERS"

if [[ $TLS == 1 ]]; then
    step "secured: down, certificates from pllava make-certs, up with docker-compose.tls.yml"
    compose down --volumes --remove-orphans --timeout 20
    CERTS=$(mktemp -d /tmp/pllava-smoke-certs.XXXXXX)
    "${BIN}pllava" make-certs "$CERTS/certs" >/dev/null
    mv "$CERTS/certs/ca-key.pem" "$CERTS/"  # no container needs the CA's key (docker-compose.tls.yml)
    export PLLAVA_CERTS_DIR=$CERTS/certs
    # The keys are the owner's alone; the containers are not root: either way of the TLS file.
    if [[ $(id -u) == 0 ]]; then
        chown -R 10001:10001 "$CERTS/certs"
    else
        export PLLAVA_USER="$(id -u):$(id -g)"
    fi
    COMPOSE_ARGS=(-p "$PROJECT" -f docker-compose.yml -f docker-compose.tls.yml -f "$OVERRIDE")
    TLS_FLAGS=(--tls-ca "$CERTS/certs/ca.pem" --tls-cert "$CERTS/certs/client.pem" --tls-key "$CERTS/certs/client-key.pem")
    t=$(now)
    compose up -d --scale encoder="$ENCODERS"
    wait_healthy "${TLS_FLAGS[@]}"
    echo "secured stack serving in $(since "$t") s"
    check_not_root

    step "caption over mutual TLS with the token (decoder -> encoders over mutual TLS with the token too)"
    t=$(now)
    for i in $(seq $((2 * ENCODERS))); do
        PLLAVA_TOKEN=$(cat "$CERTS/certs/token") "${BIN}pllava-caption" "$VIDEO" --server "127.0.0.1:$PLLAVA_PORT" \
            "${TLS_FLAGS[@]}" --max-new-tokens 4 --timeout 300 --json >"$CERTS/caption.json"
    done
    echo "captioned $((2 * ENCODERS)) times in $(since "$t") s: $(tail -n 1 "$CERTS/caption.json" | cut -c 1-160)"

    step "refusals: plaintext client, no token, a wrong token, an OpenAI request without the key"
    expect_refusal() {  # expect_refusal WORDS COMMAND...: the command fails and says WORDS
        local words=$1 out; shift
        if out=$("$@" 2>&1); then echo "expected a refusal: $*" >&2; return 1; fi
        if ! grep -q -- "$words" <<<"$out"; then echo "expected '$words' in: $out" >&2; return 1; fi
        echo "refused ($words): $(grep -m 1 -- "$words" <<<"$out" | cut -c 1-160)"
    }
    expect_refusal TLS env -u PLLAVA_TOKEN "${BIN}pllava-caption" "$VIDEO" --server "127.0.0.1:$PLLAVA_PORT" \
        --max-new-tokens 2 --timeout 60
    expect_refusal UNAUTHENTICATED env -u PLLAVA_TOKEN "${BIN}pllava-caption" "$VIDEO" \
        --server "127.0.0.1:$PLLAVA_PORT" "${TLS_FLAGS[@]}" --max-new-tokens 2 --timeout 60
    expect_refusal UNAUTHENTICATED "${BIN}pllava-caption" "$VIDEO" --server "127.0.0.1:$PLLAVA_PORT" \
        "${TLS_FLAGS[@]}" --token not-the-token --max-new-tokens 2 --timeout 60
    "$PY" - "http://127.0.0.1:$PLLAVA_API_PORT" "$CERTS/certs/token" <<'PY'
import json, sys, time, urllib.error, urllib.request

base, token = sys.argv[1], open(sys.argv[2]).read().strip()
for _ in range(120):
    try:
        urllib.request.urlopen(base + "/health", timeout=5).close()
        break
    except (urllib.error.URLError, OSError):
        time.sleep(1)
def models(headers):
    try:
        with urllib.request.urlopen(urllib.request.Request(base + "/v1/models", headers=headers), timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)
status, body = models({})
assert status == 401, (status, body)
print(f"refused (401): {body['error']['message'][:120]}")
status, body = models({"authorization": f"Bearer {token}"})
assert status == 200, (status, body)
print(f"OpenAI-compatible API with the token: model {body['data'][0]['id']} (through the decoder over mutual TLS)")
PY
    check_replicas "$ENCODERS"
fi
echo "compose smoke test passed"
