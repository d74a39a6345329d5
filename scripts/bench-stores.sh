#!/usr/bin/env bash
# Durable ingest by store, in one command and interleaved so every run sees the same
# machine: signed, unique ~1.5 KB events (the load tool of scripts/bench.sh) into
#   (s)  a router on SQLite (synchronous = full),
#   (p1) a router on PostgreSQL,
#   (p3) three routers sharing that PostgreSQL database, the load split evenly,
# each with one file sink, each router's backlog drained before the next run; then (p1)
# at half its measured rate, for latency. PostgreSQL is the server VYORA_TEST_PG_URL
# names (default: the local one); a database is created for the run and dropped after.
#
#   scripts/bench-stores.sh              # ROUNDS=3 DURATION=10s CONNS=64
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
PG=${VYORA_TEST_PG_URL:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}
SECRET=bench-secret

cargo build --release --locked --bin vyora-router --example loadgen >&2
BIN=target/release/vyora-router
LOAD=target/release/examples/loadgen

work=$(mktemp -d)
db="vyora_bench_$$"
db_url=$(python3 -c 'import sys, urllib.parse as u; p = u.urlparse(sys.argv[1]); print(u.urlunparse(p._replace(path="/" + sys.argv[2])))' "$PG" "$db")
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  psql "$PG" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
psql "$PG" -qc "CREATE DATABASE $db" >/dev/null

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A router on its own port, with the [store] lines given; prints "<pid> <port>".
start_router() {
  local name=$1 store=$2 port
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
$store
[[sinks]]
name = "archive"
type = "file"
path = "$work/$name/events.jsonl"
TOML
  "$BIN" serve --config "$work/$name/router.toml" > "$work/$name/router.log" 2>&1 &
  local pid=$!
  until curl -sf "http://127.0.0.1:$port/healthz" >/dev/null 2>&1; do sleep 0.02; done
  echo "$pid $port"
}

# Waits until nothing is pending in either store.
drained() {
  python3 - "$work/sqlite/router.db" <<'PY'
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=30)
while db.execute("SELECT COUNT(*) FROM outbox WHERE status = 'pending'").fetchone()[0]:
    time.sleep(0.2)
PY
  until [ "$(psql "$db_url" -Atc "SELECT count(*) FROM deliveries WHERE status = 'pending'")" = 0 ]; do
    sleep 0.2
  done
}

read -r pid_s port_s < <(start_router sqlite "path = \"$work/sqlite/router.db\"
synchronous = \"full\"")
pids+=("$pid_s")
pg_store="backend = \"postgres\"
url = \"$db_url\""
ports_p=()
for i in 1 2 3; do
  read -r pid port < <(start_router "pg$i" "$pg_store")
  pids+=("$pid")
  ports_p+=("$port")
done

results="$work/results.jsonl"
load() { "$LOAD" --secret "$SECRET" --duration "$DURATION" "$@" | tee -a "$results"; }
for round in $(seq "$ROUNDS"); do
  load --url "http://127.0.0.1:$port_s/webhook" --connections "$CONNS" --label "sqlite-$round"
  drained
  load --url "http://127.0.0.1:${ports_p[0]}/webhook" --connections "$CONNS" --label "pg1-$round"
  drained
  loads=()
  for port in "${ports_p[@]}"; do
    load --url "http://127.0.0.1:$port/webhook" --connections $((CONNS / 3)) --label "pg3-$round" &
    loads+=("$!")
  done
  wait "${loads[@]}"
  drained
done
half=$(python3 -c 'import json,statistics,sys; r=[json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]; print(statistics.median(x["rps"] for x in r if x["label"].startswith("pg1-"))/2)' "$results")
load --url "http://127.0.0.1:${ports_p[0]}/webhook" --connections "$CONNS" --rate "$half" --label "pg1-half-rate"

python3 - "$results" "$CONNS" <<'PY'
import json, statistics, sys
from collections import defaultdict
path, conns = sys.argv[1:]
runs = [r for r in (json.loads(l) for l in open(path) if l.startswith("{")) if "rps" in r]
med = lambda xs: statistics.median(xs)
def rounds(prefix):
    by = defaultdict(list)
    for r in runs:
        if r["label"].startswith(prefix) and r["target_rps"] is None:
            by[r["label"]].append(r)
    # A round of several load tools (pg3) adds their rates; its p99 is the worst one's.
    return [(sum(r["rps"] for r in rs), max(r["p99_ms"] for r in rs)) for rs in by.values()]
s, p1, p3 = rounds("sqlite-"), rounds("pg1-"), rounds("pg3-")
half = [r for r in runs if r["label"] == "pg1-half-rate"][0]
print()
print(f"{conns} connections, {len(s)} interleaved rounds (medians), one file sink")
print(f"(s)  SQLite, synchronous=full  : {med(x for x, _ in s):.0f} events/s, p99 {med(y for _, y in s):.2f} ms")
print(f"(p1) PostgreSQL, one replica   : {med(x for x, _ in p1):.0f} events/s, p99 {med(y for _, y in p1):.2f} ms")
print(f"(p3) PostgreSQL, three replicas: {med(x for x, _ in p3):.0f} events/s, p99 {med(y for _, y in p3):.2f} ms")
print(f"(p1)/(s) = {med(x for x, _ in p1) / med(x for x, _ in s):.0%}, (p3)/(s) = {med(x for x, _ in p3) / med(x for x, _ in s):.0%}")
print(f"(p1) at half its rate ({half['target_rps']:.0f}/s): p50 {half['p50_ms']:.2f} ms, p99 {half['p99_ms']:.2f} ms, max {half['max_ms']:.2f} ms")
bad = [r for r in runs if set(r["statuses"]) - {"200"} or r["errors"]]
if bad:
    print("WARNING: some requests were not answered 200:", [(r["label"], r["statuses"], r["errors"]) for r in bad])
PY
