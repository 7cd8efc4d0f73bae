#!/usr/bin/env bash
# One command: start PLLaVA here (encoder servers + a decoder server, no Docker), caption a
# video through the decoder with the thin client, streaming the text, and stop the servers.
#
#   scripts/demo.sh [VIDEO]                   # default samples/orbit.mp4 (in this repository)
#   MODEL=/path/to/checkpoint ENCODERS=2 PORT=50052 scripts/demo.sh video.mp4
#
# Without MODEL it uses the tiny random checkpoint (made once in ~/.cache/pllava/tiny), so
# the caption is gibberish but every part runs. The servers' log goes to a file whose path
# is printed; extra arguments after the video go to pllava-caption (--prompt, --json, ...).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VIDEO=${1:-$REPO/samples/orbit.mp4}
shift $(( $# > 0 ? 1 : 0 ))
PORT=${PORT:-50052}
# Check the input before the (long, first-time) install, not after it.
[[ -f $VIDEO ]] || { echo "demo: no video at $VIDEO" >&2; exit 2; }
bash "$REPO/scripts/bootstrap.sh"      # .venv with the project, on first use
BIN=$REPO/.venv/bin/

args=(up --port "$PORT" --encoders "${ENCODERS:-2}")
[[ -n ${MODEL:-} ]] && args+=(--model "$MODEL")
LOG=$(mktemp /tmp/pllava-up.XXXXXX.log)
echo "demo: pllava ${args[*]}   (server log: $LOG)" >&2
"${BIN}pllava" "${args[@]}" >"$LOG" 2>&1 &
UP=$!
stop() {
    kill -TERM "$UP" 2>/dev/null || true
    wait "$UP" 2>/dev/null || true
}
trap stop EXIT

# `pllava up` prints "pllava up: decoder at HOST:PORT" once every server is SERVING.
until grep -q '^pllava up: decoder at' "$LOG"; do
    if ! kill -0 "$UP" 2>/dev/null; then
        echo "demo: pllava up failed; the end of its log:" >&2
        tail -n 30 "$LOG" >&2
        exit 1
    fi
    sleep 0.5
done
grep '^pllava up: decoder at' "$LOG" >&2

echo "demo: pllava-caption $(basename "$VIDEO") --server 127.0.0.1:$PORT $*" >&2
"${BIN}pllava-caption" "$VIDEO" --server "127.0.0.1:$PORT" "$@"
