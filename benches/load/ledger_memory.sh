#!/usr/bin/env bash
# Redis memory per ledger entry, and the bound `ledger_retain` puts on it: starts a
# redis-server (no persistence) and one creditd node on free loopback ports, creates one org,
# sends purchases of 1 credit (one ledger entry each) with wrk for DURATION, and prints the
# ledger list's size (MEMORY USAGE, exact), Redis's used_memory growth with the purchases'
# call ids removed (they expire by themselves after 5 minutes), and both per entry. Then it
# restarts the node with CREDITD_LEDGER_RETAIN=SMALL, sends purchases again, and prints the
# same once the ledger was trimmed. The scripts carry ledger_retain as a constant, so the
# restart with another value caches a second set of scripts in Redis (used_memory_scripts_eval,
# printed too). Everything it starts is stopped on exit.
#
#   benches/load/ledger_memory.sh       # BIN=target/debug/creditd, DURATION=20s, SMALL=10000
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-target/debug/creditd}
DURATION=${DURATION:-20s}
SMALL=${SMALL:-10000}
[ -x "$BIN" ] || { echo "no $BIN: cargo build first" >&2; exit 1; }
command -v wrk >/dev/null || { echo "wrk is needed" >&2; exit 1; }
. benches/load/lib.sh
cport=$(free_port)
data=$(mktemp -d -t creditd-ledger-memory.XXXXXX)
pids=()
node_pid=
cleanup() { for p in "${pids[@]}" $node_pid; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$data"; }
trap cleanup EXIT
start_redis "$data" "$data/redis.log"
rport=$REDIS_PORT
pids+=("$REDIS_PID")
r() { redis-cli -p "$rport" "$@"; }
token=bench-$RANDOM
U="http://127.0.0.1:$cport"
H="Authorization: Bearer $token"
start_node() { # $1: ledger_retain
  CREDITD_STORE=redis CREDITD_REDIS_URL="redis://127.0.0.1:$rport" CREDITD_LISTEN="127.0.0.1:$cport" \
    CREDITD_DATA_DIR="$data/node" CREDITD_ADMIN_TOKEN=$token CREDITD_LEDGER_RETAIN="$1" \
    "$BIN" serve >>"$data/creditd.log" 2>&1 &
  node_pid=$!
  for _ in $(seq 1 300); do curl -sf "$U/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
}
stop_node() { kill "$node_pid"; wait "$node_pid" || true; node_pid=; }
cat >"$data/purchase.lua" <<EOF
wrk.method = "POST"
wrk.body = '{"amount":1}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $token"
EOF
used() { r INFO memory | awk -F: '/^used_memory:/ {print $2}' | tr -d '\r'; }
forget_call_ids() {
  r --scan --pattern 'creditd:{big}:idem*' | xargs -r -n 500 redis-cli -p "$rport" DEL >/dev/null
}
report() { # $1: label, $2: used_memory before the purchases
  forget_call_ids
  local len trimmed list grown
  len=$(r LLEN 'creditd:{big}:ledger')
  trimmed=$(r HGET 'creditd:{big}:meta' ledger_trimmed)
  list=$(r MEMORY USAGE 'creditd:{big}:ledger' SAMPLES 0)
  grown=$(( $(used) - $2 ))
  echo "$1: ledger_entries_kept $len ledger_trimmed ${trimmed:-0}"
  echo "$1: ledger_list_bytes $list bytes_per_entry $(( list / len ))"
  echo "$1: used_memory_growth_bytes $grown bytes_per_entry $(( grown / len ))"
  echo "$1: $(r INFO memory | tr -d '\r' | grep -E '^(used_memory_scripts_eval|number_of_cached_scripts):' | tr '\n' ' ')"
}

start_node 100000
curl -sf -XPOST "$U/v1/orgs" -H "$H" -d '{"org":"big","mode":"shared"}' >/dev/null
forget_call_ids
base=$(used)
wrk -t1 -c4 -d"$DURATION" -s "$data/purchase.lua" "$U/v1/orgs/big/credits" | grep -E 'Requests/sec|requests in'
report "retain 100000" "$base"
stop_node

start_node "$SMALL"
before=$(used)
wrk -t1 -c4 -d"$DURATION" -s "$data/purchase.lua" "$U/v1/orgs/big/credits" | grep -E 'Requests/sec|requests in'
forget_call_ids
report "retain $SMALL" "$base"
echo "retain $SMALL: used_memory_change_bytes_since_previous_report $(( $(used) - before ))"
purchased=$(curl -sf "$U/v1/orgs/big" -H "$H" | python3 -c 'import json,sys; print(json.load(sys.stdin)["purchased"])')
echo "purchased $purchased (every purchase still counted)"
stop_node
