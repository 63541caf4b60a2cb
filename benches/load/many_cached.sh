#!/usr/bin/env bash
# Many cached workspaces on one node, measured on the real process (issue #14, "many
# accounts"): generates ORGS x WORKSPACES workspaces as an export (cached_memory's EXPORT_TO),
# imports them into a fresh embedded store with `creditd import`, starts `creditd serve` on it
# and measures the time to ready and the RSS once ready, then debits every workspace once over
# HTTP (wrk, walk.lua: each request the next workspace, until all were answered) and reads the RSS with every account
# cached. Unlike `cargo bench --bench cached_memory`, the process that opens the store never
# built it, so nothing of the import is in its heap. Loopback only; everything it starts is
# stopped on exit.
#
#   benches/load/many_cached.sh      # ORGS=1000 WORKSPACES=1000
#   SKIP_BUILD=1 to use target/release/creditd and the cached_memory bench as they are.
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
. benches/load/lib.sh
ORGS=${ORGS:-1000}; WORKSPACES=${WORKSPACES:-1000}
bin="${CARGO_TARGET_DIR:-$repo/target}/release/creditd"
for tool in cargo wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "many_cached.sh: $tool is required" >&2; exit 2; }
done
data="$(mktemp -d -t creditd-cached.XXXXXX)"
pid=""
cleanup() {
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && timeout 60 tail --pid="$pid" -f /dev/null || true
  rm -rf "$data"
}
trap cleanup EXIT
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  timeout 1800 cargo build --release --locked --bin creditd
fi
export_orgs "$data/orgs.jsonl" "$ORGS" "$WORKSPACES"
started=$(date +%s%N)
timeout 1800 "$bin" import --store embedded --data-dir "$data/store" --from "$data/orgs.jsonl" >/dev/null
echo "import_ms $(( ($(date +%s%N) - started) / 1000000 ))"
echo "data_file_bytes $(stat -c %s "$data/store"/*.redb)"
port=$(free_port)
rss() { awk '/VmRSS/ {print $2 * 1024}' "/proc/$pid/status"; }
started=$(date +%s%N)
CREDITD_DATA_DIR="$data/store" CREDITD_LISTEN="127.0.0.1:$port" \
  CREDITD_ACCOUNTS_MAX=$(( ORGS * (WORKSPACES + 1) + 1000 )) "$bin" serve >"$data/node.log" 2>&1 &
pid=$!
for _ in $(seq 1 6000); do curl -sf "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break; sleep 0.1; done
curl -sf "http://127.0.0.1:$port/readyz" >/dev/null || { cat "$data/node.log"; exit 1; }
echo "time_to_ready_ms $(( ($(date +%s%N) - started) / 1000000 ))"
ready=$(rss)
echo "rss_when_ready_bytes $ready"
n=$(( ORGS * WORKSPACES ))
cat >"$data/walk.lua" <<EOF
-- Each thread walks its share of the workspaces in order: every one debited once.
local orgs, workspaces, threads = $ORGS, $WORKSPACES, 2
local headers = { ["Content-Type"] = "application/json" }
local started = 0
function setup(thread) thread:set("tid", started); started = started + 1 end
function init(args) i = tid end
function request()
  -- Cycles, so that an index wrk's first call to request() took is served on the next round.
  local k = i % (orgs * workspaces)
  local org, ws = math.floor(k / workspaces), k % workspaces
  i = i + threads
  return wrk.format("POST", "/v1/debit", headers,
    string.format('{"org":"org-%05d","workspace":"ws-%06d","amount":1}', org, ws))
end
EOF
debits_now() { # every debit answered, whatever its outcome
  curl -sf "http://127.0.0.1:$port/metrics" | grep '^creditd_debit_requests_total{' \
    | awk '{s += $NF} END {printf "%d", s}'
}
started=$(date +%s%N)
# wrk runs its whole duration even once every thread stopped: stopped when all are debited.
timeout 1200 wrk -t2 -c2 -d900s -s "$data/walk.lua" "http://127.0.0.1:$port" >"$data/wrk.log" 2>&1 &
wrk_pid=$!
for _ in $(seq 1 9000); do
  [ "$(debits_now)" -ge $(( n + 4 )) ] && break
  kill -0 "$wrk_pid" 2>/dev/null || break
  sleep 0.1
done
echo "debited_every_workspace_ms $(( ($(date +%s%N) - started) / 1000000 ))"
kill "$wrk_pid" 2>/dev/null || true
wait "$wrk_pid" 2>/dev/null || true
echo "debits $(curl -sf "http://127.0.0.1:$port/metrics" | grep '^creditd_debit_requests_total{' | tr '\n' ' ')"
cached=$(rss)
echo "rss_all_cached_bytes $cached"
python3 -c "print('bytes_per_cached_workspace %d' % (($cached - $ready) / $n)); print('rss_all_cached_mb %d' % ($cached >> 20))"
