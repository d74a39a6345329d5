#!/usr/bin/env bash
# Memory under a backlog: a router whose only sink is down (an HTTP sink pointed at a
# closed port) takes EVENTS events (default 1,000,000); its RSS after 10,000, 100,000 and
# all of them are printed side by side (SQLite's page caches, 2 MB per connection, fill up
# within the first 100,000). The backlog must live in SQLite, not in RAM. Then the sink
# comes back (a downstream answering 200 at once on that port) and the time to drain the
# whole backlog is printed.
#
#   scripts/backlog.sh            # EVENTS=1000000 CONNS=64
#   BIN=/other/vyora-router ...   # the same with another build, to compare
set -euo pipefail
cd "$(dirname "$0")/.."
EVENTS=${EVENTS:-1000000}
CONNS=${CONNS:-64}
SECRET=bench-secret
cargo build --release --locked --bin vyora-router --example loadgen --example sink_server >&2
BIN=${BIN:-target/release/vyora-router}
work=$(mktemp -d)
pid=""
cleanup() { for p in $pid $sink; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
closed=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/router.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[admin]
listen = "127.0.0.1:0"
[webhook]
secrets = ["$SECRET"]
[store]
path = "$work/router.db"
[[sinks]]
name = "down"
type = "http"
url = "http://127.0.0.1:$closed/in"
TOML
"$BIN" serve --config "$work/router.toml" > "$work/router.log" 2>&1 &
pid=$!
sink=""
until curl -fs "http://127.0.0.1:$port/healthz" >/dev/null 2>&1 || python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),timeout=1)" 2>/dev/null; do sleep 0.05; done
sleep 1
rss() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$pid/status"; }
pending() { python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(\"SELECT COUNT(*) FROM outbox WHERE status = 'pending'\").fetchone()[0])" "$work/router.db"; }
idle=$(rss)
target/release/examples/loadgen --url "http://127.0.0.1:$port/webhook" --secret "$SECRET" --connections "$CONNS" --count 10000 --label backlog-10k
sleep 2
at_10k=$(rss); backlog_10k=$(pending)
target/release/examples/loadgen --url "http://127.0.0.1:$port/webhook" --secret "$SECRET" --connections "$CONNS" --count 90000 --label backlog-100k
sleep 2
at_100k=$(rss); backlog_100k=$(pending)
target/release/examples/loadgen --url "http://127.0.0.1:$port/webhook" --secret "$SECRET" --connections "$CONNS" --count $((EVENTS - 100000)) --label backlog-rest
sleep 2
at_all=$(rss); backlog_all=$(pending)
store=$(du -sk "$work" | cut -f1)
# The sink returns: deliveries counted by the router's own metric, on its admin listener.
admin=$(grep -o 'admin listening addr=[0-9.:]*' "$work/router.log" | head -1 | cut -d= -f2)
delivered() { curl -fs "http://$admin/metrics" | awk '$1 ~ /^vyora_router_deliveries_total\{/ && /sink="down"/ && /outcome="delivered"/ { print $2 }'; }
target/release/examples/sink_server --listen "127.0.0.1:$closed" > /dev/null &
sink=$!
started=$(date +%s.%N)
while [ "$(delivered | cut -d. -f1)" -lt "$backlog_all" ]; do sleep 0.5; done
drain=$(python3 -c "import sys, time; print(round(time.time() - float(sys.argv[1]), 1))" "$started")
echo
echo "idle RSS ${idle} kB"
echo "backlog ${backlog_10k}: RSS ${at_10k} kB"
echo "backlog ${backlog_100k}: RSS ${at_100k} kB"
echo "backlog ${backlog_all}: RSS ${at_all} kB (store ${store} kB, $(( store * 1024 / backlog_all )) bytes per event)"
echo "drained ${backlog_all} in ${drain} s ($(python3 -c "print(round($backlog_all / $drain))") deliveries/s)"
