#!/usr/bin/env bash
# Cluster load run: one redis-server and NODES creditd release binaries (store = redis) on free
# loopback ports, one budget-mode org (10^15 in ws-a), one wrk per node debiting the same
# workspace at once. Then it reads every node's /metrics: debits allowed, store calls, Redis
# round trips, so "store calls per debit" is measured, not guessed. It stops all but the first
# node (SIGTERM: settle, return leases), checks on the first that `used` equals every node's
# allowed debits and that conservation holds, and stops it. Talks only to 127.0.0.1.
#
# Usage: benches/load/cluster.sh   (needs cargo, redis-server, wrk, curl, jq, python3)
# Env:   NODES (default 3), DURATION (default 10s), CONNS per node (default 16),
#        SKIP_BUILD=1 to use an existing target/release/creditd.
# Every step is bounded: build 30 min, each start 30 s, wrk DURATION + 30 s, each stop 30 s.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
bin="${CARGO_TARGET_DIR:-$repo/target}/release/creditd"
NODES="${NODES:-3}"
DURATION="${DURATION:-10s}"
CONNS="${CONNS:-16}"
ORG=bench
WS=ws-a
PURCHASE=1000000000000000

for tool in cargo redis-server redis-cli wrk curl jq python3; do
  command -v "$tool" >/dev/null || { echo "cluster.sh: $tool is required" >&2; exit 2; }
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  (cd "$repo" && timeout 1800 cargo build --release --bin creditd)
fi

. "$repo/benches/load/lib.sh"
data="$(mktemp -d -t creditd-cluster.XXXXXX)"
token="load-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
redis_port="$(free_port)"
pids=()
redis_pid=""

stop_pid() {
  local pid="$1"
  kill -TERM "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$pid" 2>/dev/null || true
}
cleanup() {
  for pid in "${pids[@]}"; do [ -n "$pid" ] && stop_pid "$pid"; done
  if [ -n "$redis_pid" ]; then
    { kill -KILL "$redis_pid" && wait "$redis_pid"; } 2>/dev/null || true
  fi
  rm -rf "$data"
}
trap cleanup EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
  --dir "$data" --logfile "$data/redis.log" --daemonize no &
redis_pid=$!
for i in $(seq 1 150); do
  redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
  [ "$i" = 150 ] && { echo "redis-server not up within 30 s"; exit 1; }
  sleep 0.2
done

bases=()
for n in $(seq 0 $(( NODES - 1 ))); do
  port="$(free_port)"
  CREDITD_STORE=redis CREDITD_REDIS_URL="redis://127.0.0.1:$redis_port" CREDITD_NODE_ID="node-$n" \
    CREDITD_LISTEN="127.0.0.1:$port" CREDITD_DATA_DIR="$data/node-$n" CREDITD_ADMIN_TOKEN="$token" \
    "$bin" serve >"$data/node-$n.out" 2>"$data/node-$n.log" &
  pids+=($!)
  bases+=("http://127.0.0.1:$port")
  for i in $(seq 1 150); do
    curl -fsS -m 1 "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    [ "$i" = 150 ] && { echo "node-$n not ready within 30 s"; cat "$data/node-$n.log"; exit 1; }
    sleep 0.2
  done
done

admin() {
  curl -fsS -m 30 -X "$1" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    ${3:+--data "$3"} "${bases[0]}$2"
}
admin POST /v1/orgs "{\"org\":\"$ORG\",\"mode\":\"budget\"}" >/dev/null
admin POST "/v1/orgs/$ORG/credits" "{\"amount\":$PURCHASE}" >/dev/null
admin POST "/v1/orgs/$ORG/workspaces" "{\"workspace\":\"$WS\"}" >/dev/null
admin POST "/v1/orgs/$ORG/transfers" "{\"from\":\"primary\",\"to\":\"$WS\",\"amount\":$PURCHASE}" >/dev/null

echo "## $NODES nodes, one wrk per node: -t1 -c$CONNS -d$DURATION, all on ws-a of one org"
wrk_pids=()
for n in $(seq 0 $(( NODES - 1 ))); do
  LOAD_ORG=$ORG LOAD_WS=$WS timeout "$(( ${DURATION%s} + 30 ))" \
    wrk -t1 -c"$CONNS" -d"$DURATION" --timeout 5s --latency -s "$here/debit.lua" "${bases[$n]}" \
    >"$data/wrk-$n.out" &
  wrk_pids+=($!)
done
for p in "${wrk_pids[@]}"; do wait "$p"; done

metric() { # metric BASE PATTERN: the sum of the series matching PATTERN
  curl -fsS -m 10 "$1/metrics" | awk -v pat="$2" '$0 ~ pat && !/^#/ { n += $NF } END { printf "%d\n", n }'
}
total_allowed=0
echo "| node | req/s | p50 us | p99 us | allowed | store calls | redis round trips | store calls per debit |"
echo "| ---- | ----: | -----: | -----: | ------: | ----------: | ----------------: | --------------------: |"
for n in $(seq 0 $(( NODES - 1 ))); do
  line="$(grep '^RESULT' "$data/wrk-$n.out")"
  val() { echo "$line" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k { print $2 }'; }
  rps="$(awk -v r="$(val requests)" -v us="$(val duration_us)" 'BEGIN { printf "%.0f", r / (us / 1e6) }')"
  allowed="$(metric "${bases[$n]}" '^creditd_debit_requests_total\\{.*outcome="allowed"')"
  calls="$(metric "${bases[$n]}" '^creditd_store_calls_total\\{')"
  redis_calls="$(metric "${bases[$n]}" '^creditd_store_calls_total\\{op="redis_')"
  [ "$(val bad_status)" = 0 ] || { echo "node-$n: $(val bad_status) answers >= 400"; exit 1; }
  total_allowed=$(( total_allowed + allowed ))
  per="$(awk -v c="$calls" -v a="$allowed" 'BEGIN { printf "%.5f", (a ? c / a : 0) }')"
  echo "| node-$n | $rps | $(val p50_us) | $(val p99_us) | $allowed | $calls | $redis_calls | $per |"
done

# Stop all but the first: they settle everything and return their leases.
for n in $(seq 1 $(( NODES - 1 ))); do stop_pid "${pids[$n]}"; pids[$n]=""; done
view="$(admin GET "/v1/orgs/$ORG")"
purchased="$(jq -r .purchased <<<"$view")"; total="$(jq -r .total_credits <<<"$view")"
used="$(jq -r .used <<<"$view")"
echo
echo "purchased=$purchased total_credits=$total used=$used; allowed on all nodes: $total_allowed"
fail=0
[ "$purchased" -eq $(( total + used )) ] && echo "conservation: OK" || { echo "conservation: BROKEN"; fail=1; }
[ "$used" -eq "$total_allowed" ] && echo "used == allowed on all nodes: OK" || { echo "used != allowed"; fail=1; }
stop_pid "${pids[0]}"; pids[0]=""
exit "$fail"
