#!/usr/bin/env bash
# Soak (issue #14, "bounded Redis"): NODES release nodes on one redis-server, each under paced
# load (wrk, random workspaces of ORGS x WORKSPACES, at most RATE debits a second per node),
# and every RENAME_EVERY seconds one node is stopped (SIGTERM) and started again under a NEW
# node id, as pods are. Every SAMPLE_EVERY seconds it prints one SAMPLE line: Redis's
# used_memory, its keys, the node records and tombstones of all orgs, the ledger entries kept,
# and each node's RSS. Node records of renamed nodes go after NODE_FORGET_AFTER (the nodes run
# with a short LEASE_TTL and NODE_FORGET_AFTER so that the soak meets them), ledgers stop
# growing at LEDGER_RETAIN: memory must level off. At the end it checks that every org is
# conserved (purchased = total_credits + used). Loopback only; everything it starts is stopped
# on exit; logs stay in target/soak/.
#
#   benches/load/soak.sh      # DURATION=600 NODES=3 RENAME_EVERY=60 ORGS=20 WORKSPACES=100
#   SKIP_BUILD=1 to use target/release/creditd and the cached_memory bench as they are.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
. benches/load/lib.sh
DURATION=${DURATION:-600}; NODES=${NODES:-3}; RENAME_EVERY=${RENAME_EVERY:-60}
ORGS=${ORGS:-20}; WORKSPACES=${WORKSPACES:-100}; RATE=${RATE:-500}; SAMPLE_EVERY=${SAMPLE_EVERY:-30}
LEASE_TTL=${LEASE_TTL:-5s}; NODE_FORGET_AFTER=${NODE_FORGET_AFTER:-15s}
LEDGER_RETAIN=${LEDGER_RETAIN:-2000}
bin="${CARGO_TARGET_DIR:-$repo/target}/release/creditd"
for tool in cargo redis-server redis-cli wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "soak.sh: $tool is required" >&2; exit 2; }
done
data="$(mktemp -d -t creditd-soak.XXXXXX)"
logs="$repo/target/soak"
declare -A pid_of
redis_pid=""
wrk_pids=()
cleanup() {
  for w in "${wrk_pids[@]}"; do kill "$w" 2>/dev/null || true; done
  for p in "${pid_of[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pid_of[@]}"; do timeout 30 tail --pid="$p" -f /dev/null 2>/dev/null || true; done
  [ -n "$redis_pid" ] && kill "$redis_pid" 2>/dev/null || true
  mkdir -p "$logs" && cp "$data"/*.log "$logs"/ 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  timeout 1800 cargo build --release --locked --bin creditd
fi
export_orgs "$data/orgs.jsonl" "$ORGS" "$WORKSPACES"
start_redis "$data" "$data/redis.log"
rport=$REDIS_PORT
redis_pid=$REDIS_PID
r() { redis-cli -p "$rport" "$@"; }
url="redis://127.0.0.1:$rport"
timeout 600 "$bin" import --store redis --redis-url "$url" --from "$data/orgs.jsonl" >/dev/null
token="soak-$RANDOM$RANDOM"
ports=()
for n in $(seq 1 "$NODES"); do ports+=("$(free_port)"); done

# start SLOT NAME: a node on slot's port under node id NAME.
start() {
  local slot=$1 name=$2 port=${ports[$1]}
  CREDITD_STORE=redis CREDITD_REDIS_URL="$url" CREDITD_LISTEN="127.0.0.1:$port" \
    CREDITD_NODE_ID="$name" CREDITD_DATA_DIR="$data/$name" CREDITD_ADMIN_TOKEN="$token" \
    CREDITD_LEASE_TTL="$LEASE_TTL" CREDITD_NODE_FORGET_AFTER="$NODE_FORGET_AFTER" \
    CREDITD_LEDGER_RETAIN="$LEDGER_RETAIN" \
    "$bin" serve >"$data/$name.log" 2>&1 &
  pid_of[$slot]=$!
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && return; sleep 0.1; done
  echo "soak.sh: node $name did not become ready" >&2; exit 1
}
stop() { # stop SLOT: SIGTERM, wait (bounded) for the clean stop
  local p=${pid_of[$1]}
  kill "$p" 2>/dev/null || true
  timeout 60 tail --pid="$p" -f /dev/null 2>/dev/null || true
}
for slot in $(seq 0 $((NODES - 1))); do start "$slot" "pod-$slot-0"; done

# Paced load: each wrk connection waits so that a node sees at most RATE debits a second.
conns=4
delay_ms=$(( 1000 * conns / RATE ))
cat >"$data/soak.lua" <<EOF
dofile("$repo/benches/load/many.lua")
function delay() return $delay_ms end
EOF
for slot in $(seq 0 $((NODES - 1))); do
  LOAD_ORGS=$ORGS LOAD_WORKSPACES=$WORKSPACES timeout $((DURATION + 60)) wrk -t1 -c$conns \
    -d"${DURATION}s" -s "$data/soak.lua" "http://127.0.0.1:${ports[$slot]}" \
    >"$data/wrk-$slot.log" 2>&1 &
  wrk_pids+=($!)
done

sample() {
  local used keys nodes gone ledger rss=""
  used=$(r INFO memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
  keys=$(r DBSIZE)
  nodes=0; gone=0; ledger=0
  for i in $(seq 0 $((ORGS - 1))); do
    o=$(printf 'org-%05d' "$i")
    nodes=$((nodes + $(r SCARD "creditd:{$o}:nodes")))
    gone=$((gone + $(r HLEN "creditd:{$o}:gone")))
    ledger=$((ledger + $(r LLEN "creditd:{$o}:ledger")))
  done
  for slot in $(seq 0 $((NODES - 1))); do
    rss+="$(awk '/VmRSS/ {print $2 * 1024}' "/proc/${pid_of[$slot]}/status" 2>/dev/null || echo 0),"
  done
  echo "SAMPLE t=$1 redis_used_memory=$used redis_keys=$keys node_records=$nodes tombstones=$gone ledger_entries=$ledger node_rss=${rss%,}"
}

t0=$(date +%s)
next_rename=$RENAME_EVERY; next_sample=0; generation=1; slot=0; renames=0
while :; do
  t=$(( $(date +%s) - t0 ))
  [ "$t" -ge "$DURATION" ] && break
  if [ "$t" -ge "$next_sample" ]; then sample "$t"; next_sample=$((next_sample + SAMPLE_EVERY)); fi
  if [ "$t" -ge "$next_rename" ]; then
    stop "$slot"
    start "$slot" "pod-$slot-$generation"
    renames=$((renames + 1))
    slot=$(( (slot + 1) % NODES ))
    [ "$slot" = 0 ] && generation=$((generation + 1))
    next_rename=$((next_rename + RENAME_EVERY))
  fi
  sleep 1
done
for w in "${wrk_pids[@]}"; do wait "$w" || true; done
wrk_pids=()
sample "$DURATION"
echo "renames=$renames"
for slot in $(seq 0 $((NODES - 1))); do echo "wrk slot $slot: $(grep RESULT "$data/wrk-$slot.log" || echo none)"; done
# Conservation of every org, read through one node.
H="Authorization: Bearer $token"
bad=0
for i in $(seq 0 $((ORGS - 1))); do
  o=$(printf 'org-%05d' "$i")
  curl -sf "http://127.0.0.1:${ports[0]}/v1/orgs/$o?limit=1" -H "$H" | python3 -c '
import json, sys
v = json.load(sys.stdin)
sys.exit(0 if v["purchased"] == v["total_credits"] + v["used"] else 1)' || { echo "org $o is not conserved"; bad=1; }
done
[ "$bad" = 0 ] && echo "conservation ok for $ORGS orgs"
exit "$bad"
