#!/usr/bin/env bash
# Ingest benchmark, in one command and interleaved so that every run sees the same machine:
#   (a) durable:  signed, unique ~1.5 KB events into a router with the file sink;
#   (b) all sinks: the same into a second router with file, RabbitMQ and HTTP sinks;
#   (c) baseline: the same requests with a wrong signature into (a)'s router, refused
#       before the store (HTTP and HMAC work, no store);
#   (d) minimal: the same requests into examples/minimal_ingest.rs, the simplest durable
#       receiver (verify, append with a unique text key, group commit of 64; no routing,
#       deliveries or sinks), the yardstick for (a).
#   (e) sink down: (a)'s router with its only sink an HTTP destination that refuses
#       connections, so nothing is delivered: what ingest costs without delivery's work
#       (the outage the acknowledgement promise is about; its backlog grows meanwhile).
# Then (a) at half of its measured maximum rate for latency, memory (idle and peak RSS),
# time from spawn to healthy, and the ratios. RabbitMQ is used when it answers on
# VYORA_TEST_AMQP_URL (default amqp://guest:guest@127.0.0.1:5672/%2f); without it (b) is
# skipped.
#
#   scripts/bench.sh                      # ROUNDS=3 DURATION=10s CONNS=64 SYNC=full
#   BEFORE=/other/vyora-router ...        # also (a) with that build, interleaved: (a')
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
SYNC=${SYNC:-full}
BEFORE=${BEFORE:-}
AMQP_URL=${VYORA_TEST_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}
SECRET=bench-secret

cargo build --release --locked --bin vyora-router --example loadgen --example sink_server --example amqp_bench --example minimal_ingest >&2
BIN=target/release/vyora-router
LOAD=target/release/examples/loadgen

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

# A router on its own port and store, with this build or the one named third, and the
# sinks named fourth instead of the file sink; prints "<pid> <port> <ms to healthy>".
start_router() {
  local name=$1 extra=$2 bin=${3:-$BIN} port
  local sinks=${4:-"[[sinks]]
name = \"archive\"
type = \"file\"
path = \"$work/$name/events.jsonl\""}
  port=$(free_port)
  mkdir -p "$work/$name"
  cat > "$work/$name/router.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[admin]
listen = "127.0.0.1:0"
[webhook]
secrets = ["$SECRET"]
[store]
path = "$work/$name/router.db"
synchronous = "$SYNC"
$sinks
$extra
TOML
  python3 - "$bin" "$work/$name/router.toml" "$port" "$work/$name/router.log" <<'PY'
import socket, subprocess, sys, time
binary, config, port, log = sys.argv[1:]
t0 = time.monotonic()
p = subprocess.Popen([binary, "serve", "--config", config], stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
while True:
    try:
        s = socket.create_connection(("127.0.0.1", int(port)), timeout=1)
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\n")
        if s.recv(64).startswith(b"HTTP/1.1 200"):
            break
    except OSError:
        pass
    time.sleep(0.001)
print(p.pid, port, round((time.monotonic() - t0) * 1000, 1))
PY
}

rss_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }

# Waits until a router has delivered everything, so its background work never runs into
# the next measurement.
drained() {
  python3 - "$work/$1/router.db" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30)
deadline = time.monotonic() + 300
while db.execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'").fetchone()[0]:
    if time.monotonic() > deadline:
        sys.exit("the backlog did not drain within 300 s")
    time.sleep(0.2)
PY
}

read -r pid_a port_a start_a < <(start_router durable "")
pids+=("$pid_a")
if [ -n "$BEFORE" ]; then
  read -r pid_e port_e _ < <(start_router before "" "$BEFORE")
  pids+=("$pid_e")
fi
read -r pid_s port_s _ < <(start_router sinkdown "" "$BIN" "[[sinks]]
name = \"down\"
type = \"http\"
url = \"http://127.0.0.1:$(free_port)/in\"")
pids+=("$pid_s")
target/release/examples/minimal_ingest --db "$work/minimal.db" --secret "$SECRET" > "$work/minimal.addr" &
pids+=("$!")
while [ ! -s "$work/minimal.addr" ]; do sleep 0.05; done
addr_d=$(cat "$work/minimal.addr")

have_b=0
if timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/5672" 2>/dev/null; then
  exchange="vyora-bench-$(date +%s)-$$"
  queue=$(target/release/examples/amqp_bench --url "$AMQP_URL" --declare "$exchange")
  target/release/examples/sink_server > "$work/sink.addr" &
  pids+=("$!")
  while [ ! -s "$work/sink.addr" ]; do sleep 0.05; done
  sink_addr=$(cat "$work/sink.addr")
  read -r pid_b port_b _ < <(start_router allsinks "
[[sinks]]
name = \"crm\"
type = \"http\"
url = \"http://$sink_addr/in\"
concurrency = 16
[[sinks]]
name = \"queue\"
type = \"amqp\"
url = \"$AMQP_URL\"
exchange = \"$exchange\"
")
  pids+=("$pid_b")
  have_b=1
else
  echo "RabbitMQ does not answer: skipping (b)" >&2
fi

sleep 1
idle_a=$(rss_kb "$pid_a" VmRSS)
results="$work/results.jsonl"
load() { "$LOAD" --secret "$SECRET" --connections "$CONNS" --duration "$DURATION" "$@" | tee -a "$results"; }
for round in $(seq "$ROUNDS"); do
  load --url "http://127.0.0.1:$port_a/webhook" --label "durable-$round"
  drained durable
  if [ -n "$BEFORE" ]; then
    load --url "http://127.0.0.1:$port_e/webhook" --label "before-$round"
    drained before
  fi
  if [ "$have_b" = 1 ]; then
    load --url "http://127.0.0.1:$port_b/webhook" --label "allsinks-$round"
    drained allsinks
  fi
  load --url "http://127.0.0.1:$port_a/webhook" --bad-signature --label "baseline-$round"
  load --url "http://$addr_d/webhook" --label "minimal-$round"
  load --url "http://127.0.0.1:$port_s/webhook" --label "sinkdown-$round"
done
# The other routers stop first: (a)'s latency at half rate is its own, not the neighbours'
# background work (a backlog's retries, its gauges).
peak_b=0
[ "$have_b" = 1 ] && peak_b=$(rss_kb "$pid_b" VmHWM)
for p in "${pids[@]}"; do
  if [ "$p" != "$pid_a" ]; then kill "$p" 2>/dev/null || true; fi
done
half=$(python3 -c 'import json,statistics,sys; r=[json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]; print(statistics.median(x["rps"] for x in r if x["label"].startswith("durable-"))/2)' "$results")
load --url "http://127.0.0.1:$port_a/webhook" --rate "$half" --label "durable-half-rate"
peak_a=$(rss_kb "$pid_a" VmHWM)

python3 - "$results" "$idle_a" "$peak_a" "$peak_b" "$start_a" "$SYNC" "$CONNS" <<'PY'
import json, statistics, sys
path, idle, peak_a, peak_b, start_ms, sync, conns = sys.argv[1:]
runs = [r for r in (json.loads(l) for l in open(path) if l.startswith("{")) if "rps" in r]
def group(prefix):
    return [r for r in runs if r["label"].startswith(prefix) and r["target_rps"] is None]
med = lambda rs, k: statistics.median(r[k] for r in rs)
a, b, c, d = group("durable-"), group("allsinks-"), group("baseline-"), group("minimal-")
e = group("before-")
down = group("sinkdown-")
half = [r for r in runs if r["label"] == "durable-half-rate"][0]
print()
print(f"synchronous={sync}, {conns} connections, {len(a)} interleaved rounds (medians)")
print(f"(a) durable, file sink     : {med(a,'rps'):.0f} events/s, p50 {med(a,'p50_ms'):.2f} ms, p99 {med(a,'p99_ms'):.2f} ms")
if b:
    print(f"(b) file + RabbitMQ + HTTP : {med(b,'rps'):.0f} events/s, p50 {med(b,'p50_ms'):.2f} ms, p99 {med(b,'p99_ms'):.2f} ms")
print(f"(c) baseline (refused)     : {med(c,'rps'):.0f} requests/s, p50 {med(c,'p50_ms'):.2f} ms, p99 {med(c,'p99_ms'):.2f} ms")
print(f"(d) minimal durable design: {med(d,'rps'):.0f} events/s, p50 {med(d,'p50_ms'):.2f} ms, p99 {med(d,'p99_ms'):.2f} ms")
print(f"(e) sink down (no delivery): {med(down,'rps'):.0f} events/s, p50 {med(down,'p50_ms'):.2f} ms, p99 {med(down,'p99_ms'):.2f} ms; (e)/(d) = {med(down,'rps')/med(d,'rps'):.0%}, (e)/(c) = {med(down,'rps')/med(c,'rps'):.0%}")
if e:
    print(f"(a') (a) with BEFORE       : {med(e,'rps'):.0f} events/s, p50 {med(e,'p50_ms'):.2f} ms, p99 {med(e,'p99_ms'):.2f} ms; (a)/(a') = {med(a,'rps')/med(e,'rps'):.0%}")
print(f"(a)/(c) = {med(a,'rps')/med(c,'rps'):.0%}, (a)/(d) = {med(a,'rps')/med(d,'rps'):.0%}" + (f", (b)/(c) = {med(b,'rps')/med(c,'rps'):.0%}, (b)/(a) = {med(b,'rps')/med(a,'rps'):.0%}" if b else ""))
print(f"(a) at half its rate ({half['target_rps']:.0f}/s): p50 {half['p50_ms']:.2f} ms, p99 {half['p99_ms']:.2f} ms, max {half['max_ms']:.2f} ms")
print(f"memory: idle RSS {int(idle)/1024:.1f} MB; peak RSS (a) {int(peak_a)/1024:.1f} MB" + (f", (b) {int(peak_b)/1024:.1f} MB" if b else ""))
print(f"start-up: healthy {start_ms} ms after spawn")
bad = [r for r in runs if r["label"].startswith(("durable", "allsinks", "minimal", "before", "sinkdown")) and (set(r["statuses"]) - {"200"} or r["errors"])]
if bad:
    print("WARNING: some durable requests were not answered 200:", [(r["label"], r["statuses"], r["errors"]) for r in bad])
PY
