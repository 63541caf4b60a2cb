#!/usr/bin/env bash
# Cost as an org grows (issue #14, target 2: "a control-plane change and a settle cost at most
# 2x more at 10,000 workspaces than at 10, on both stores; in Redis, Redis's own time per
# script call"). For each org size in SIZES and each store in STORES: generates one budget-mode
# org of N workspaces (1,000 credits each) as an export file with cached_memory's EXPORT_TO,
# imports it into a fresh store (a redis-server without persistence, or a fresh embedded data
# dir), starts one release node on it, then measures:
#
#   settle    one workspace debited under wrk (-t1 -c$CONNS) for SETTLE_SECS; the node's
#             settler sends its batches. Node: creditd_settle_duration_seconds sum/count (one
#             settle store call). Redis: INFO commandstats of EVALSHA over the phase.
#   create    K x POST /v1/orgs/{org}/workspaces (new workspaces, deleted again below)
#   transfer  K x POST /v1/orgs/{org}/transfers, 1 credit between two existing workspaces
#   delete    K x DELETE /v1/orgs/{org}/workspaces/{ws} of the workspaces created above
#
# Control calls are timed client-side (curl time_total, median and mean); Redis's statistics
# are reset (CONFIG RESETSTAT) before each phase. Output: one `ROW` line per (store, size,
# operation), then one `RATIO` line per (store, operation) for the largest size over the
# smallest. Loopback only; everything it starts is stopped on exit; nodes' logs are kept in
# $CARGO_TARGET_DIR/org_size/ (target/org_size/).
#
#   benches/load/org_size.sh         # SIZES="10 10000" STORES="redis embedded" K=50
#   SIZES="10 3000" STORES=redis SETTLE_SECS=10 CONNS=4 BIN=target/release/creditd benches/load/org_size.sh
#   SKIP_BUILD=1 to use BIN and the cached_memory bench as they are (cargo still runs the bench).
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
. benches/load/lib.sh
SIZES=${SIZES:-"10 10000"}; STORES=${STORES:-"redis embedded"}; K=${K:-50}
SETTLE_SECS=${SETTLE_SECS:-10}; CONNS=${CONNS:-4}
target="${CARGO_TARGET_DIR:-$repo/target}"
BIN=${BIN:-$target/release/creditd}
for tool in cargo redis-server redis-cli wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "org_size.sh: $tool is required" >&2; exit 2; }
done
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  timeout 1800 nice cargo build --release --locked --bin creditd
fi
[ -x "$BIN" ] || { echo "org_size.sh: no $BIN: cargo build --release first" >&2; exit 2; }

data="$(mktemp -d -t creditd-org-size.XXXXXX)"
logs="$target/org_size"
node_pid=""; redis_pid=""
stop() { # SIGTERM, then wait at most 30 s (a node settles and returns its leases), then SIGKILL
  local p=$1
  [ -n "$p" ] || return 0
  kill "$p" 2>/dev/null || return 0
  timeout 30 tail --pid="$p" -f /dev/null 2>/dev/null || kill -9 "$p" 2>/dev/null || true
}
cleanup() {
  stop "$node_pid"; stop "$redis_pid"  # the node first, Redis last
  mkdir -p "$logs" && cp "$data"/*.log "$logs"/ 2>/dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT
r() { timeout 30 redis-cli -p "$rport" "$@"; }

token="orgsize-$RANDOM$RANDOM"
H="Authorization: Bearer $token"
ORG=org-00000              # cached_memory's names
HOT=ws-000000              # the debited workspace
FROM=ws-000001; TO=ws-000002

# One file of results: store size op key=value...
results="$data/results"
: >"$results"

# Redis's INFO commandstats as "evalsha_calls evalsha_usec all_calls all_usec" (EVAL counted
# with EVALSHA: the same script sent with its source after NOSCRIPT).
redis_stats() {
  r INFO commandstats | tr -d '\r' | python3 -c '
import sys
ev = [0, 0]; al = [0, 0]; by = []
for line in sys.stdin:
    if not line.startswith("cmdstat_"): continue
    name, rest = line[len("cmdstat_"):].split(":", 1)
    f = dict(kv.split("=") for kv in rest.strip().split(","))
    c, u = int(f["calls"]), int(f["usec"])
    al[0] += c; al[1] += u
    if name in ("evalsha", "eval"): ev[0] += c; ev[1] += u
    else: by.append("%s:%d" % (name, c))
print(ev[0], ev[1], al[0], al[1], ",".join(sorted(by)) or "-")'
}
# The node's metrics we read: settle sum (s) and count, and store calls by op, as one line.
node_stats() {
  curl -sf -m 30 "http://127.0.0.1:$cport/metrics" | python3 -c '
import sys
s = c = 0.0; ops = {}
for line in sys.stdin:
    if line.startswith("#"): continue
    parts = line.rsplit(" ", 1)
    if len(parts) != 2: continue
    name, v = parts
    if name == "creditd_settle_duration_seconds_sum": s = float(v)
    elif name == "creditd_settle_duration_seconds_count": c = float(v)
    elif name.startswith("creditd_store_calls_total{"):
        op = name.split("op=\"", 1)[1].split("\"", 1)[0]
        ops[op] = float(v)
print(s, c, ",".join("%s=%d" % kv for kv in sorted(ops.items())) or "-")'
}
# "before" and "after" node_stats lines, and the number of operations -> key=value fields
node_delta() {
  python3 - "$1" "$2" "$3" <<'EOF'
import sys
b, a, n = sys.argv[1].split(), sys.argv[2].split(), int(sys.argv[3])
ds, dc = float(a[0]) - float(b[0]), float(a[1]) - float(b[1])
def ops(s): return {} if s == "-" else {k: float(v) for k, v in (x.split("=") for x in s.split(","))}
ob, oa = ops(b[2]), ops(a[2])
per = ",".join("%s=%.1f" % (k, (oa[k] - ob.get(k, 0)) / max(n, 1))
               for k in sorted(oa) if oa[k] - ob.get(k, 0) > 0) or "-"
mean = "%.3f" % (1000 * ds / dc) if dc > 0 else "-"
print("node_settles=%d node_settle_mean_ms=%s node_store_calls_per_op=%s" % (dc, mean, per))
EOF
}
redis_delta() { # after-reset stats, number of operations -> key=value fields
  python3 - "$1" "$2" <<'EOF'
import sys
a = sys.argv[1].split(); n = int(sys.argv[2])
ec, eu, ac, au = map(int, a[:4])
upc = "%.1f" % (eu / ec) if ec else "-"
# Other commands include those the scripts call themselves (Redis counts them too, and their
# time is inside the script's): named so that a command sent by the node stands out.
print("redis_evalsha_calls=%d redis_usec_per_call=%s redis_evalsha_per_op=%.1f "
      "redis_evalsha_usec_per_op=%.0f redis_other_commands=%s"
      % (ec, upc, ec / max(n, 1), eu / max(n, 1), a[4]))
EOF
}
# K timed calls; each line of $1 is "method path body"; prints median/mean ms and failures
timed_calls() {
  local file=$1 out="$data/times" method path body
  : >"$out"
  while read -r method path body; do
    if [ -n "$body" ]; then
      curl -s -m 120 -o /dev/null -w '%{http_code} %{time_total}\n' -X"$method" \
        "http://127.0.0.1:$cport$path" -H "$H" -d "$body" >>"$out" || true
    else
      curl -s -m 120 -o /dev/null -w '%{http_code} %{time_total}\n' -X"$method" \
        "http://127.0.0.1:$cport$path" -H "$H" >>"$out" || true
    fi
  done <"$file"
  python3 - "$out" <<'EOF'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
ok = [float(t) * 1000 for c, t in rows if c.startswith("2")]
bad = len(rows) - len(ok)
if ok:
    print("calls=%d failed=%d client_median_ms=%.2f client_mean_ms=%.2f"
          % (len(rows), bad, statistics.median(ok), statistics.mean(ok)))
else:
    print("calls=%d failed=%d client_median_ms=- client_mean_ms=-" % (len(rows), bad))
EOF
}
row() { # store size op fields...
  local line="ROW store=$1 workspaces=$2 op=$3 ${*:4}"
  echo "$line"; echo "$line" >>"$results"
}

for n in $SIZES; do
  export_file="$data/org-$n.jsonl"
  export_orgs "$export_file" 1 "$n"
  for store in $STORES; do
    echo "## $store, 1 org of $n workspaces (+ primary)"
    dir="$data/$store-$n"; mkdir -p "$dir"
    # Room for the org, the K created during the run and some slack; the primary is an account.
    limits=(CREDITD_WORKSPACES_MAX=$((n + K + 100)) CREDITD_ACCOUNTS_MAX=$((n + K + 1000 > 1000000 ? n + K + 1000 : 1000000)))
    case $store in
      redis)
        start_redis "$dir" "$data/redis-$n.log"
        rport=$REDIS_PORT
        redis_pid=$REDIS_PID
        store_env=(CREDITD_STORE=redis CREDITD_REDIS_URL="redis://127.0.0.1:$rport" CREDITD_DATA_DIR="$dir/node")
        ;;
      embedded)
        store_env=(CREDITD_STORE=embedded CREDITD_DATA_DIR="$dir/db")
        ;;
      *) echo "org_size.sh: unknown store $store" >&2; exit 2 ;;
    esac
    started=$(date +%s%N)
    env "${store_env[@]}" "${limits[@]}" timeout 600 "$BIN" import --from "$export_file"
    echo "imported in $(( ($(date +%s%N) - started) / 1000000 )) ms"
    cport=$(free_port)
    env "${store_env[@]}" "${limits[@]}" CREDITD_LISTEN="127.0.0.1:$cport" \
      CREDITD_ADMIN_TOKEN="$token" CREDITD_NODE_ID=bench \
      "$BIN" serve >"$data/node-$store-$n.log" 2>&1 &
    node_pid=$!
    ready=0
    for _ in $(seq 1 600); do
      curl -sf -m 1 "http://127.0.0.1:$cport/readyz" >/dev/null 2>&1 && { ready=1; break; }
      kill -0 "$node_pid" 2>/dev/null || break
      sleep 0.1
    done
    [ "$ready" = 1 ] || { echo "node not ready:"; tail -20 "$data/node-$store-$n.log"; exit 1; }
    U="http://127.0.0.1:$cport"
    # Credits enough that the debited workspace never runs out (10^15, the largest one call takes).
    curl -sf -m 120 -o /dev/null -XPOST "$U/v1/orgs/$ORG/credits" -H "$H" -d '{"amount":1000000000000000}'
    curl -sf -m 120 -o /dev/null -XPOST "$U/v1/orgs/$ORG/transfers" -H "$H" \
      -d "{\"from\":\"primary\",\"to\":\"$HOT\",\"amount\":1000000000000000}"
    # One debit loads the org into the node before anything is measured.
    curl -sf -m 120 -o /dev/null -XPOST "$U/v1/debit" -d "{\"org\":\"$ORG\",\"workspace\":\"$HOT\",\"amount\":1}"
    sleep 2

    # settle
    before=$(node_stats)
    [ "$store" = redis ] && r CONFIG RESETSTAT >/dev/null
    LOAD_ORG=$ORG LOAD_WS=$HOT timeout $((SETTLE_SECS + 60)) wrk -t1 -c"$CONNS" -d"${SETTLE_SECS}s" \
      -s benches/load/debit.lua "$U" >"$data/wrk-$store-$n.log" 2>&1
    [ "$store" = redis ] && rs=$(redis_stats)
    after=$(node_stats)
    w=$(grep -o 'requests=[0-9]* duration_us=[0-9]* bad_status=[0-9]*' "$data/wrk-$store-$n.log" || echo "requests=- duration_us=- bad_status=-")
    nd=$(node_delta "$before" "$after" 1)
    fields="$w ${nd%% node_store_calls_per_op=*} node_store_calls=${nd##*node_store_calls_per_op=}"
    [ "$store" = redis ] && fields="$fields $(redis_delta "$rs" "$(echo "$nd" | sed 's/node_settles=\([0-9]*\).*/\1/')")"
    row "$store" "$n" settle "$fields"

    # control-plane changes
    for op in create transfer delete; do
      calls="$data/calls"
      : >"$calls"
      for i in $(seq 1 "$K"); do
        case $op in
          create) echo "POST /v1/orgs/$ORG/workspaces {\"workspace\":\"new-$i\"}" ;;
          transfer) echo "POST /v1/orgs/$ORG/transfers {\"from\":\"$FROM\",\"to\":\"$TO\",\"amount\":1}" ;;
          delete) echo "DELETE /v1/orgs/$ORG/workspaces/new-$i" ;;
        esac >>"$calls"
      done
      before=$(node_stats)
      [ "$store" = redis ] && r CONFIG RESETSTAT >/dev/null
      t=$(timed_calls "$calls")
      [ "$store" = redis ] && rs=$(redis_stats)
      after=$(node_stats)
      fields="$t $(node_delta "$before" "$after" "$K")"
      [ "$store" = redis ] && fields="$fields $(redis_delta "$rs" "$K")"
      row "$store" "$n" "$op" "$fields"
    done

    # conservation, as a check that the run did what it says
    curl -sf -m 120 "$U/v1/orgs/$ORG?limit=1" -H "$H" | python3 -c '
import json, sys
v = json.load(sys.stdin)
print("conservation %s purchased=%d total_credits=%d used=%d"
      % ("ok" if v["purchased"] == v["total_credits"] + v["used"] else "BROKEN",
         v["purchased"], v["total_credits"], v["used"]))'
    stop "$node_pid"; node_pid=""
    if [ "$store" = redis ]; then stop "$redis_pid"; redis_pid=""; fi
  done
done

echo "## ratios: largest size / smallest size"
python3 - "$results" "$SIZES" <<'EOF'
import sys
sizes = sys.argv[2].split()
small, big = sizes[0], sizes[-1]
rows = {}
for line in open(sys.argv[1]):
    f = dict(kv.split("=", 1) for kv in line.split()[1:])
    rows[(f["store"], f["workspaces"], f["op"])] = f
metrics = ["redis_usec_per_call", "redis_evalsha_usec_per_op", "node_settle_mean_ms",
           "client_median_ms", "client_mean_ms"]
seen = []
for (store, _, op) in rows:
    if (store, op) not in seen: seen.append((store, op))
for store, op in seen:
    a, b = rows.get((store, small, op)), rows.get((store, big, op))
    if not a or not b: continue
    out = []
    for m in metrics:
        try: out.append("%s=%.1f" % (m, float(b[m]) / float(a[m])))
        except (KeyError, ValueError, ZeroDivisionError): pass
    print("RATIO store=%s op=%s sizes=%s/%s %s" % (store, op, big, small, " ".join(out)))
EOF
