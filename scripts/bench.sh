#!/usr/bin/env bash
# Ingest benchmark. Starts the release router (SQLite + file sink) and runs, interleaved in
# one command so that both see the same machine:
#   (a) durable: signed, unique events; each 200 is a committed event and outbox row;
#   (b) baseline: the same requests with a wrong signature, refused before the store
#       (the HTTP and HMAC work without the store).
# Then (a) at half of its measured maximum rate for the latency figure, and the memory and
# start-up figures. Prints one JSON line per run and a summary with the ratios.
#
#   scripts/bench.sh                      # ROUNDS=3 DURATION=10s CONNS=64 SYNC=full
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
SYNC=${SYNC:-full}
SECRET=bench-secret

cargo build --release --locked --bin vyora-router --example loadgen >&2
BIN=target/release/vyora-router
LOAD=target/release/examples/loadgen

work=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$work/router.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
[webhook]
secrets = ["$SECRET"]
[store]
path = "$work/router.db"
synchronous = "$SYNC"
[[sinks]]
name = "archive"
type = "file"
path = "$work/events.jsonl"
TOML

rss_kb() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$pid/status"; }

# Time from spawn to the first 200 from /healthz, polled every millisecond.
start_ms=$(python3 - "$BIN" "$work/router.toml" "$port" "$work/router.log" "$work/pid" <<'PY'
import socket, subprocess, sys, time
binary, config, port, log, pidfile = sys.argv[1:]
t0 = time.monotonic()
p = subprocess.Popen([binary, "serve", "--config", config], stdout=open(log, "w"), stderr=subprocess.STDOUT)
open(pidfile, "w").write(str(p.pid))
while True:
    try:
        s = socket.create_connection(("127.0.0.1", int(port)), timeout=1)
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: r\r\nconnection: close\r\n\r\n")
        if s.recv(64).startswith(b"HTTP/1.1 200"):
            break
    except OSError:
        pass
    time.sleep(0.001)
print(round((time.monotonic() - t0) * 1000, 1))
PY
)
pid=$(cat "$work/pid")
sleep 1
idle_rss=$(rss_kb VmRSS)

url="http://127.0.0.1:$port/webhook"
results="$work/results.jsonl"
for round in $(seq "$ROUNDS"); do
  "$LOAD" --url "$url" --secret "$SECRET" --connections "$CONNS" --duration "$DURATION" --label "durable-$round" | tee -a "$results"
  "$LOAD" --url "$url" --secret "$SECRET" --connections "$CONNS" --duration "$DURATION" --bad-signature --label "baseline-$round" | tee -a "$results"
done
half=$(python3 -c 'import json,statistics,sys; r=[json.loads(l) for l in open(sys.argv[1])]; print(statistics.median(x["rps"] for x in r if x["mode"]=="valid")/2)' "$results")
"$LOAD" --url "$url" --secret "$SECRET" --connections "$CONNS" --duration "$DURATION" --rate "$half" --label "durable-half-rate" | tee -a "$results"
peak_rss=$(rss_kb VmHWM)

python3 - "$results" "$idle_rss" "$peak_rss" "$start_ms" "$SYNC" "$CONNS" <<'PY'
import json, statistics, sys
path, idle, peak, start_ms, sync, conns = sys.argv[1:]
runs = [json.loads(l) for l in open(path)]
durable = [r for r in runs if r["mode"] == "valid" and r["target_rps"] is None]
base = [r for r in runs if r["mode"] == "bad_signature"]
half = [r for r in runs if r["label"] == "durable-half-rate"][0]
med = lambda rs, k: statistics.median(r[k] for r in rs)
print()
print(f"synchronous={sync}, {conns} connections, {len(durable)} interleaved rounds (medians)")
print(f"(a) durable  : {med(durable,'rps'):.0f} events/s, p50 {med(durable,'p50_ms'):.2f} ms, p99 {med(durable,'p99_ms'):.2f} ms")
print(f"(b) baseline : {med(base,'rps'):.0f} requests/s, p50 {med(base,'p50_ms'):.2f} ms, p99 {med(base,'p99_ms'):.2f} ms")
print(f"(a)/(b)      : {med(durable,'rps')/med(base,'rps'):.0%}")
print(f"half rate    : {half['target_rps']:.0f}/s -> {half['rps']:.0f}/s, p50 {half['p50_ms']:.2f} ms, p99 {half['p99_ms']:.2f} ms, max {half['max_ms']:.2f} ms")
print(f"memory       : idle RSS {int(idle)/1024:.1f} MB, peak RSS {int(peak)/1024:.1f} MB")
print(f"start-up     : healthy {start_ms} ms after spawn")
bad = [r for r in durable + [half] if set(r["statuses"]) - {"200"} or r["errors"]]
if bad:
    print("WARNING: some durable requests were not answered 200:", [(r["label"], r["statuses"], r["errors"]) for r in bad])
PY
