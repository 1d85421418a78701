#!/usr/bin/env bash
# One command from a fresh clone to live events: installs what is missing,
# starts a private redis-server and the broker, serves the live dashboard
# example, feeds it with the demo publisher and shows the SSE stream as a
# browser receives it. Ctrl-C stops it all.
#
#   examples/quickstart.sh            # runs for 60 seconds
#   SECONDS_TO_RUN=600 examples/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."

REDIS_PORT=${REDIS_PORT:-6399}
BROKER_PORT=${BROKER_PORT:-8080}
ADMIN_PORT=${ADMIN_PORT:-9464}
PAGE_PORT=${PAGE_PORT:-8000}
RUN_FOR=${SECONDS_TO_RUN:-60}

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
if ((${#need_apt[@]})); then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}"
fi
if [ ! -x .venv/bin/sse-broker ]; then
    echo "== installing sse-broker into .venv"
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[speed]'
fi

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

echo "== redis-server on 127.0.0.1:$REDIS_PORT"
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$work" \
    >"$work/redis.log" 2>&1 &
pids+=($!)

export SSE_BROKER_REDIS_URL="redis://127.0.0.1:$REDIS_PORT/0"
echo "== sse-broker on http://127.0.0.1:$BROKER_PORT/events (metrics: http://127.0.0.1:$ADMIN_PORT/metrics)"
.venv/bin/sse-broker serve --config config/broker.toml \
    --set server.listen="127.0.0.1:$BROKER_PORT" --set admin.listen="127.0.0.1:$ADMIN_PORT" \
    --set "server.cors_origins=[\"http://127.0.0.1:$PAGE_PORT\"]" \
    2>"$work/broker.log" &
pids+=($!)

for _ in $(seq 100); do
    curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -sf "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null || {
    echo "broker did not become ready:"; cat "$work/broker.log"; exit 1; }

# The page: the live dashboard example, served as static files.
.venv/bin/python -m http.server --bind 127.0.0.1 "$PAGE_PORT" --directory examples \
    >"$work/http.log" 2>&1 &
pids+=($!)
echo "== live dashboard: open http://127.0.0.1:$PAGE_PORT/dashboard/?broker=http://127.0.0.1:$BROKER_PORT"

# The publisher: what a PHP app does with $redis->publish('sse:orders', json_encode([...])).
.venv/bin/python examples/dashboard/publisher.py --seconds "$RUN_FOR" --rate 2 >"$work/publisher.log" 2>&1 &
pids+=($!)

echo "== streaming GET /events?channel=orders&channel=metrics&channel=log for ${RUN_FOR}s (Ctrl-C to stop)"
echo
timeout "$RUN_FOR" curl -sN -H 'Accept: text/event-stream' \
    "http://127.0.0.1:$BROKER_PORT/events?channel=orders&channel=metrics&channel=log" || true
