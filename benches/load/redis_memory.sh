#!/usr/bin/env bash
# Redis memory and Redis's own time per script call as one org grows: starts a redis-server
# (no persistence) and one creditd node on free loopback ports, creates an org with
# WORKSPACES workspaces one call at a time, and prints Redis's used_memory, its keys, and the
# calls and µs per call of each creditd script (INFO commandstats). Everything it starts is
# stopped on exit.
#
#   benches/load/redis_memory.sh              # BIN=target/debug/creditd, WORKSPACES=2000
#   BIN=target/release/creditd WORKSPACES=3000 benches/load/redis_memory.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/debug/creditd}
WORKSPACES=${WORKSPACES:-2000}
[ -x "$BIN" ] || { echo "no $BIN: cargo build first" >&2; exit 1; }
. benches/load/lib.sh
cport=$(free_port)
data=$(mktemp -d -t creditd-redis-memory.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT
start_redis "$data" "$data/redis.log"
rport=$REDIS_PORT
pids+=("$REDIS_PID")
r() { redis-cli -p "$rport" "$@"; }
token=bench-$RANDOM
CREDITD_STORE=redis CREDITD_REDIS_URL="redis://127.0.0.1:$rport" CREDITD_LISTEN="127.0.0.1:$cport" \
  CREDITD_DATA_DIR="$data/node" CREDITD_ADMIN_TOKEN=$token CREDITD_WORKSPACES_MAX=100000 \
  "$BIN" serve >"$data/creditd.log" 2>&1 &
pids+=($!)
U="http://127.0.0.1:$cport"
for _ in $(seq 1 300); do curl -sf "$U/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
H="Authorization: Bearer $token"
base=$(r INFO memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
curl -sf -XPOST "$U/v1/orgs" -H "$H" -d '{"org":"big","mode":"budget"}' >/dev/null
curl -sf -XPOST "$U/v1/orgs/big/credits" -H "$H" -d '{"amount":1000000000}' >/dev/null
r CONFIG RESETSTAT >/dev/null
start=$(date +%s%N)
for i in $(seq 1 "$WORKSPACES"); do
  curl -sf -o /dev/null -XPOST "$U/v1/orgs/big/workspaces" -H "$H" -d "{\"workspace\":\"ws-$i\"}"
done
secs=$(( ($(date +%s%N) - start) / 1000000 ))
used=$(r INFO memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r')
count=$(curl -sf "$U/v1/orgs/big" -H "$H" | grep -o '"workspace":' | wc -l)
echo "workspaces_created $((count - 1)) in ${secs} ms"
echo "redis_keys $(r DBSIZE)"
echo "redis_used_memory_bytes $((used - base))"
echo "redis_bytes_per_workspace $(( (used - base) / (count - 1) ))"
r INFO commandstats | tr -d '\r' | awk -F'[:,=]' '/^cmdstat_(evalsha|eval):/ {print "redis_" $1 " calls=" $3 " usec_per_call=" $7}'
