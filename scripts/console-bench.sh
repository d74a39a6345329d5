#!/usr/bin/env bash
# The console and the operator commands on a large store: EVENTS events (default
# 1,000,000) routed to a file sink and to an HTTP sink whose downstream refuses every 20th
# request (5% dead deliveries). Then each page is asked for ROUNDS times and its median and
# slowest answer printed, in milliseconds: the overview, the deliveries list, a call's
# page, the dead letters, and the `events list` and `events show` commands. Last, the
# ingest rate with the live view open against without, in interleaved rounds of 10 s, as
# a ratio (the same machine, the same command: noise hits both alike).
#
#   scripts/console-bench.sh            # EVENTS=1000000 CONNS=64 ROUNDS=20
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-1000000}
CONNS=${CONNS:-64}
ROUNDS=${ROUNDS:-20}
SECRET=bench-secret
cargo build --release --locked --bin vyora-router --example loadgen --example sink_server >&2
BIN=target/release/vyora-router
LOAD=target/release/examples/loadgen
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

target/release/examples/sink_server --refuse-every 20 > "$work/sink.addr" &
pids+=("$!")
while [ ! -s "$work/sink.addr" ]; do sleep 0.05; done
port=$(free_port)
admin="127.0.0.1:$(free_port)"
cat > "$work/router.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[admin]
listen = "$admin"
[webhook]
secrets = ["$SECRET"]
[store]
path = "$work/router.db"
[[sinks]]
name = "archive"
type = "file"
path = "$work/events.jsonl"
[[sinks]]
name = "crm"
type = "http"
url = "http://$(cat "$work/sink.addr")/in"
concurrency = 16
TOML
"$BIN" serve --config "$work/router.toml" > "$work/router.log" 2>&1 &
pids+=("$!")
until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; do sleep 0.05; done

# The store: EVENTS events, every delivery settled (5% of crm's dead).
"$LOAD" --url "http://127.0.0.1:$port/webhook" --secret "$SECRET" --connections "$CONNS" \
  --count "$EVENTS" --duration 3600s --run-id 1 --label fill >&2
pending() {
  curl -fs "http://$admin/metrics" | awk '$1 ~ /^vyora_router_outbox_pending\{/ { s += $2 } END { print s + 0 }'
}
sleep 11 # the backlog gauges are refreshed every 10 s
until [ "$(pending)" = 0 ]; do sleep 5; done
dead=$(curl -fs "http://$admin/metrics" | awk '$1 ~ /^vyora_router_outbox_dead\{/ && /sink="crm"/ { print $2 }')
echo "store: $EVENTS events, $dead dead deliveries to crm, $(du -sm "$work/router.db" | cut -f1) MB"

# Median and slowest of ROUNDS runs of a command that prints seconds, in milliseconds.
timed() {
  local label=$1; shift
  for _ in $(seq "$ROUNDS"); do "$@"; done | sort -n | awk -v label="$label" '
    { t[NR] = $1 * 1000 }
    END { printf "%-22s median %7.1f ms   slowest %7.1f ms\n", label, t[int((NR + 1) / 2)], t[NR] }'
}
page() { curl -fs -o /dev/null -w '%{time_total}\n' "http://$admin$1"; }
cli() {
  local start end
  start=$(date +%s%N)
  "$BIN" "$@" --config "$work/router.toml" > /dev/null
  end=$(date +%s%N)
  awk -v s="$start" -v e="$end" 'BEGIN { print (e - s) / 1e9 }'
}
call="load-1-7-12"
timed "overview" page /ui
timed "deliveries list" page /ui/events
timed "dead deliveries" page "/ui/events?status=dead"
timed "a call's page" page "/ui/call?id=$call"
timed "dead letters" page /ui/dead
timed "events list" cli events list
timed "events list --status dead" cli events list --sink crm --status dead
timed "events show" cli events show "$call"

# Ingest with the live view open, against without: interleaved, 3 runs each.
rate() {
  "$LOAD" --url "http://127.0.0.1:$port/webhook" --secret "$SECRET" --connections "$CONNS" \
    --duration 10s --label "$1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["rps"])'
}
# Each run starts with the last one's 100,000 events delivered, so that neither kind of
# run shares the machine with the other's backlog, and the order is without, with, with,
# without, without, with: a store that grows by each run slows the later ones, alike.
drained() { sleep 11; until [ "$(pending)" = 0 ]; do sleep 2; done; }
without=(); with=()
for kind in without with with without without with; do
  drained
  if [ "$kind" = with ]; then
    curl -sN "http://$admin/ui/live/events" > /dev/null &
    viewer=$!
    sleep 0.5
    with+=("$(rate with)")
    kill "$viewer"; wait "$viewer" 2>/dev/null || true
  else
    without+=("$(rate without)")
  fi
done
python3 - "${without[*]}" "${with[*]}" <<'PY'
import statistics, sys
without = [float(x) for x in sys.argv[1].split()]
with_ = [float(x) for x in sys.argv[2].split()]
a, b = statistics.median(without), statistics.median(with_)
print(f"ingest without a viewer {a:,.0f}/s, with the live view open {b:,.0f}/s: {b / a:.0%}")
PY
