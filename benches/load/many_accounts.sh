#!/usr/bin/env bash
# Many active accounts on a cluster (issue #14, "many accounts"): generates ORGS x WORKSPACES
# budget-mode workspaces (1,000 credits each) as an export file, imports it into a fresh
# redis-server, starts NODES creditd release nodes on it, and runs one wrk per node debiting
# random workspaces of random orgs. Then it reads each node's /metrics and prints debits
# allowed, store calls, and store calls per 1,000 debits, and each node's RSS. Loopback only;
# everything it starts is stopped on exit; the logs are kept in target/many_accounts/.
#
#   benches/load/many_accounts.sh      # ORGS=100 WORKSPACES=1000 NODES=3 DURATION=20s CONNS=16
#   SKIP_BUILD=1 to reuse target/release/creditd and the bench binary.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
. benches/load/lib.sh
ORGS=${ORGS:-100}; WORKSPACES=${WORKSPACES:-1000}; NODES=${NODES:-3}
DURATION=${DURATION:-20s}; CONNS=${CONNS:-16}
bin="${CARGO_TARGET_DIR:-$repo/target}/release/creditd"
for tool in cargo redis-server redis-cli wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "many_accounts.sh: $tool is required" >&2; exit 2; }
done
data="$(mktemp -d -t creditd-many.XXXXXX)"
pids=()
logs="$repo/target/many_accounts"
cleanup() {
  # Nodes first (they settle and return their leases on SIGTERM), Redis (pids[0]) last.
  for p in "${pids[@]:1}" "${pids[0]:-}"; do
    [ -n "$p" ] || continue
    kill "$p" 2>/dev/null || true
    timeout 30 tail --pid="$p" -f /dev/null 2>/dev/null || true
  done
  # The nodes' and wrk's logs stay for inspection.
  mkdir -p "$logs" && cp "$data"/*.log "$logs"/ 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  timeout 1800 cargo build --release --bin creditd
fi
export_orgs "$data/orgs.jsonl" "$ORGS" "$WORKSPACES"
start_redis "$data" "$data/redis.log"
rport=$REDIS_PORT
pids+=("$REDIS_PID")
url="redis://127.0.0.1:$rport"
timeout 600 "$bin" import --store redis --redis-url "$url" --from "$data/orgs.jsonl"
token="many-$RANDOM$RANDOM"
ports=()
for n in $(seq 1 "$NODES"); do
  port=$(free_port)
  CREDITD_STORE=redis CREDITD_REDIS_URL="$url" CREDITD_LISTEN="127.0.0.1:$port" \
    CREDITD_NODE_ID="n$n" CREDITD_DATA_DIR="$data/n$n" CREDITD_ADMIN_TOKEN="$token" \
    CREDITD_ACCOUNTS_MAX=$(( ORGS * (WORKSPACES + 1) + 1000 )) \
    "$bin" serve >"$data/n$n.log" 2>&1 &
  pids+=($!)
  ports+=("$port")
done
for port in "${ports[@]}"; do
  for _ in $(seq 1 300); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null && break; sleep 0.1; done
done
started=$(date +%s%N)
wrks=()
for port in "${ports[@]}"; do
  LOAD_ORGS=$ORGS LOAD_WORKSPACES=$WORKSPACES timeout 300 wrk -t1 -c"$CONNS" -d"$DURATION" \
    -s benches/load/many.lua "http://127.0.0.1:$port" >"$data/wrk-$port.log" 2>&1 &
  wrks+=($!)
done
for w in "${wrks[@]}"; do wait "$w"; done
metric() { # sum of a metric's samples whose line matches $2
  curl -sf "http://127.0.0.1:$1/metrics" | grep -v '^#' | grep "^$2" | awk '{s += $NF} END {printf "%d", s}'
}
total_allowed=0; total_calls=0
i=0
for port in "${ports[@]}"; do
  i=$((i + 1))
  allowed=$(metric "$port" 'creditd_debit_requests_total{outcome="allowed"}')
  refused=$(metric "$port" 'creditd_debit_requests_total{outcome="insufficient"}')
  calls=$(metric "$port" 'creditd_store_calls_total')
  rss=$(awk '/VmRSS/ {print $2 * 1024}' "/proc/${pids[$i]}/status")
  echo "node n$i: allowed=$allowed insufficient=$refused store_calls=$calls rss_bytes=$rss $(grep RESULT "$data/wrk-$port.log")"
  total_allowed=$((total_allowed + allowed)); total_calls=$((total_calls + calls))
done
echo "workspaces=$((ORGS * WORKSPACES)) nodes=$NODES duration=$DURATION allowed=$total_allowed store_calls=$total_calls"
python3 -c "print('store_calls_per_1000_debits %.1f' % (1000.0 * $total_calls / max($total_allowed, 1)))"
echo "redis_used_memory_bytes $(redis-cli -p "$rport" INFO memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')"
