#!/usr/bin/env bash
# Bytes written to disk per accepted event: the router process's `write_bytes` in
# /proc/<pid>/io over a load run (WAL, checkpoints and the file sink's lines together),
# divided by the events accepted. Two set-ups, interleaved: one file sink, and three sinks
# (file, HTTP, RabbitMQ when it answers), and examples/minimal_ingest.rs (the simplest
# durable receiver: verify, append with a unique text key; no sinks) as a yardstick. The
# figure is a count of bytes, not a speed, so
# it compares across machines; the payload is the load tool's (~1.5 KB, as Vyora sends).
#
#   scripts/bytes-per-event.sh            # ROUNDS=3 COUNT=20000 CONNS=64
#   STORE_EXTRA='commit_interval = "0s"' ... # extra [store] lines, to compare settings
#   BEFORE=/other/vyora-router ...        # also that build, interleaved, to compare
#   PREFILL=500000 ...                    # first store that many events, unmeasured: a
#                                         # store with history, whose dedup index is large
#                                         # (one file sink and the minimal design only)
#   RATE=5000 ...                         # send at that rate instead of as fast as the
#                                         # router answers: fewer events share a commit
#   TURNS=40 ...                          # a longer call: that many more transcript turns
#                                         # in each payload (40: ~5 KB, 100: ~11 KB)
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
COUNT=${COUNT:-20000}
CONNS=${CONNS:-64}
AMQP_URL=${VYORA_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
STORE_EXTRA=${STORE_EXTRA:-}
BEFORE=${BEFORE:-}
PREFILL=${PREFILL:-0}
RATE=${RATE:-}
TURNS=${TURNS:-0}
SECRET=bench-secret
rate=()
[ -n "$RATE" ] && rate=(--rate "$RATE")

cargo build --release --locked --bin vyora-router --example loadgen --example sink_server --example amqp_bench --example minimal_ingest >&2
BIN=target/release/vyora-router
LOAD=(target/release/examples/loadgen --extra-turns "$TURNS")

work=$(mktemp -d)
pids=()
queue=""
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "$queue" ] && target/release/examples/amqp_bench --url "$AMQP_URL" --delete-queue "$queue" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
write_bytes() { awk '$1 == "write_bytes:" { print $2 }' "/proc/$1/io"; }

target/release/examples/sink_server > "$work/sink.addr" &
pids+=("$!")
while [ ! -s "$work/sink.addr" ]; do sleep 0.05; done
more_sinks="
[[sinks]]
name = \"crm\"
type = \"http\"
url = \"http://$(cat "$work/sink.addr")/in\"
concurrency = 16"
if timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/5672" 2>/dev/null; then
  exchange="vyora-bytes-$(date +%s)-$$"
  queue=$(target/release/examples/amqp_bench --url "$AMQP_URL" --declare "$exchange")
  more_sinks="$more_sinks
[[sinks]]
name = \"queue\"
type = \"amqp\"
url = \"$AMQP_URL\"
exchange = \"$exchange\""
fi

# One run on a new store (holding PREFILL events first), with this build or the one
# named third: prints "<label> <bytes per event> <file bytes per event>".
run() {
  local label=$1 sinks=$2 bin=${3:-$BIN} dir="$work/$1-$RANDOM" port pid before after file_before
  port=$(free_port)
  mkdir -p "$dir"
  cat > "$dir/router.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[admin]
listen = "127.0.0.1:0"
[webhook]
secrets = ["$SECRET"]
[store]
path = "$dir/router.db"
$STORE_EXTRA
[[sinks]]
name = "archive"
type = "file"
path = "$dir/events.jsonl"
$sinks
TOML
  # Its log goes through a pipe, as to a container runtime: the figure counts the store
  # and the sinks, not the log (an INFO line per webhook, ~160 bytes, where it is kept).
  "$bin" serve --config "$dir/router.toml" > >(cat > "$dir/router.log") 2>&1 &
  pid=$!
  until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; do sleep 0.02; done
  if [ "$PREFILL" -gt 0 ]; then
    "${LOAD[@]}" --secret "$SECRET" --url "http://127.0.0.1:$port/webhook" --connections "$CONNS" \
      --count "$PREFILL" --duration 3600s --label "$label-prefill" >&2
    sleep 5
  fi
  sleep 1
  before=$(write_bytes "$pid")
  file_before=$(stat -c %s "$dir/events.jsonl" 2>/dev/null || echo 0)
  "${LOAD[@]}" --secret "$SECRET" --url "http://127.0.0.1:$port/webhook" --connections "$CONNS" \
    --count "$COUNT" --duration 600s "${rate[@]}" --check-file "$dir/events.jsonl" --label "$label" >&2
  # Every sink done and the checkpoints caught up: what the run cost, all of it.
  sleep 5
  after=$(write_bytes "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "$label $(( (after - before) / COUNT )) $(( ($(stat -c %s "$dir/events.jsonl") - file_before) / COUNT ))"
}

# The same load into the minimal design: "minimal <bytes per event> 0".
run_minimal() {
  local dir="$work/minimal-$RANDOM" pid before after
  mkdir -p "$dir"
  target/release/examples/minimal_ingest --db "$dir/min.db" --secret "$SECRET" > "$dir/addr" &
  pid=$!
  while [ ! -s "$dir/addr" ]; do sleep 0.02; done
  if [ "$PREFILL" -gt 0 ]; then
    "${LOAD[@]}" --secret "$SECRET" --url "http://$(cat "$dir/addr")/webhook" --connections "$CONNS" \
      --count "$PREFILL" --duration 3600s --label minimal-prefill >&2
    sleep 5
  fi
  sleep 1
  before=$(write_bytes "$pid")
  "${LOAD[@]}" --secret "$SECRET" --url "http://$(cat "$dir/addr")/webhook" --connections "$CONNS" \
    --count "$COUNT" --duration 600s "${rate[@]}" --label minimal >&2
  sleep 5
  after=$(write_bytes "$pid")
  kill "$pid"; wait "$pid" 2>/dev/null || true
  echo "minimal $(( (after - before) / COUNT )) 0"
}

payload=$("${LOAD[@]}" --secret "$SECRET" --print-payload-size)
for round in $(seq "$ROUNDS"); do
  # With a prefill, one sink only: a broker queue of that many messages measures the
  # broker, not the router.
  run one-sink ""
  if [ "$PREFILL" -eq 0 ]; then run three-sinks "$more_sinks"; fi
  run_minimal
  if [ -n "$BEFORE" ]; then
    run before-one-sink "" "$BEFORE"
    if [ "$PREFILL" -eq 0 ]; then run before-three-sinks "$more_sinks" "$BEFORE"; fi
  fi
done | tee "$work/results.txt"
python3 - "$work/results.txt" "$payload" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
payload = int(sys.argv[2])
print(f"payload {payload} bytes")
for label in ("one-sink", "three-sinks", "minimal", "before-one-sink", "before-three-sinks"):
    mine = [r for r in rows if r[0] == label]
    if not mine:
        continue
    per_event = statistics.median(int(r[1]) for r in mine)
    line = statistics.median(int(r[2]) for r in mine)
    print(f"{label:18}: {per_event:.0f} bytes written per event ({per_event / payload:.1f}x the payload; median of {len(mine)}); file line {line:.0f} bytes")
PY
