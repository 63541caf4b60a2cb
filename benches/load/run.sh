#!/usr/bin/env bash
# Load run of the real binary, end to end: builds release, starts `creditd serve` on a free
# loopback port with a fresh data folder, seeds one budget-mode org (10^15 purchased, all of it
# moved to ws-a), runs wrk against /v1/debit (JSON) and /v1/authorize (headers) at 32 and 256
# connections, checks conservation and that `used` matches the answers, stops creditd with
# SIGTERM, and prints the results. Talks only to 127.0.0.1.
#
# Usage: benches/load/run.sh            (from anywhere; needs cargo, wrk, curl, jq, python3)
# Env:   DURATION (default 15s; whole seconds, with the "s"), THREADS (default 2),
#        CONNS (default "32 256"), SKIP_BUILD=1 to use an existing target/release/creditd,
#        KEEP=1 to keep the data folder and creditd's log.
# Every step is bounded: build 30 min, start 30 s, each wrk run DURATION + 30 s, stop 30 s.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
bin="$target/release/creditd"
DURATION="${DURATION:-15s}"
THREADS="${THREADS:-2}"
CONNS="${CONNS:-32 256}"
ORG=bench
WS=ws-a
PURCHASE=1000000000000000 # 10^15, the largest amount one call accepts

for tool in cargo wrk curl jq python3; do
  command -v "$tool" >/dev/null || { echo "run.sh: $tool is required" >&2; exit 2; }
done

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "## build: cargo build --release"
  (cd "$repo" && timeout 1800 cargo build --release --bin creditd)
fi
[ -x "$bin" ] || { echo "run.sh: no $bin" >&2; exit 2; }

data="$(mktemp -d -t creditd-load.XXXXXX)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"
token="load-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
pid=""

cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  if [ "${KEEP:-0}" = 1 ]; then echo "data and log kept in $data"; else rm -rf "$data"; fi
}
trap cleanup EXIT

echo "## start: $bin serve on $base, data in $data"
CREDITD_LISTEN="127.0.0.1:$port" CREDITD_DATA_DIR="$data/db" CREDITD_ADMIN_TOKEN="$token" \
  "$bin" serve >"$data/creditd.out" 2>"$data/creditd.log" &
pid=$!
for i in $(seq 1 150); do
  if curl -fsS -m 1 "$base/readyz" >/dev/null 2>&1; then break; fi
  kill -0 "$pid" 2>/dev/null || { echo "creditd exited:"; cat "$data/creditd.log"; exit 1; }
  [ "$i" = 150 ] && { echo "creditd not ready within 30 s"; cat "$data/creditd.log"; exit 1; }
  sleep 0.2
done

# admin METHOD PATH [BODY]: a control-plane call; prints the body, fails on a non-2xx.
admin() {
  curl -fsS -m 30 -X "$1" -H "Authorization: Bearer $token" -H 'Content-Type: application/json' \
    ${3:+--data "$3"} "$base$2"
}
used() { admin GET "/v1/orgs/$ORG" | jq -r .used; }
# Allowed debits as creditd counted them (the Prometheus counter), 0 before the first one.
allowed() {
  curl -fsS -m 10 "$base/metrics" |
    awk '/^creditd_debit_requests_total\{/ && /outcome="allowed"/ { n += $NF } END { printf "%d\n", n }'
}

echo "## seed: org $ORG (budget), purchase $PURCHASE, workspace $WS, transfer all of it to $WS"
admin POST /v1/orgs "{\"org\":\"$ORG\",\"mode\":\"budget\"}" >/dev/null
admin POST "/v1/orgs/$ORG/credits" "{\"amount\":$PURCHASE}" >/dev/null
admin POST "/v1/orgs/$ORG/workspaces" "{\"workspace\":\"$WS\"}" >/dev/null
admin POST "/v1/orgs/$ORG/transfers" "{\"from\":\"primary\",\"to\":\"$WS\",\"amount\":$PURCHASE}" >/dev/null
# One debit of each form, checked by hand, before loading.
curl -fsS -m 5 -H 'Content-Type: application/json' \
  --data "{\"org\":\"$ORG\",\"workspace\":\"$WS\",\"amount\":1}" "$base/v1/debit" | jq -c .
curl -fsS -m 5 -o /dev/null -w 'authorize: %{http_code}\n' \
  -H "X-Credits-Org: $ORG" -H "X-Credits-Workspace: $WS" "$base/v1/authorize"
warm=2

results=()
total_ok=0
fail_runs=0
for conns in $CONNS; do
  for form in debit authorize; do
    before="$(used)"
    echo "## wrk -t$THREADS -c$conns -d$DURATION --latency -s $form.lua $base"
    out="$(LOAD_ORG=$ORG LOAD_WS=$WS timeout "$(( ${DURATION%s} + 30 ))" \
      wrk -t"$THREADS" -c"$conns" -d"$DURATION" --timeout 5s --latency -s "$here/$form.lua" "$base")"
    echo "$out" | grep -v '^RESULT'
    line="$(echo "$out" | grep '^RESULT')"
    val() { echo "$line" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k { print $2 }'; }
    after="$(used)"
    reqs="$(val requests)"; bad="$(val bad_status)"
    ok=$(( reqs - bad ))
    delta=$(( after - before ))
    total_ok=$(( total_ok + ok ))
    rps="$(awk -v n="$reqs" -v us="$(val duration_us)" 'BEGIN { printf "%.0f", n / (us / 1e6) }')"
    errs="connect=$(val connect) read=$(val read) write=$(val write) timeout=$(val timeout)"
    echo "   answered $reqs (status >= 400: $bad; socket errors: $errs); used grew by $delta" \
      "($(( delta - ok )) more than the 2xx wrk read: answers in flight when wrk stopped)"
    # Each connection can have had at most one answer in flight when wrk stopped.
    if [ "$delta" -lt "$ok" ] || [ $(( delta - ok )) -gt "$conns" ]; then
      echo "   used grew by $delta for $ok answers read at $conns connections: not explained"
      fail_runs=$(( fail_runs + 1 ))
    fi
    results+=("$(printf '| %-9s | %4s | %10s | %7s | %7s | %7s | %8s | %12s | %12s | %4s |' \
      "$form" "$conns" "$rps" "$(val p50_us)" "$(val p90_us)" "$(val p99_us)" "$(val p999_us)" \
      "$ok" "$delta" "$bad")")
  done
done

view="$(admin GET "/v1/orgs/$ORG")"
purchased="$(jq -r .purchased <<<"$view")"
total="$(jq -r .total_credits <<<"$view")"
used_now="$(jq -r .used <<<"$view")"
counted="$(allowed)"

echo "## stop: SIGTERM"
kill -TERM "$pid"
status=""
for _ in $(seq 1 150); do
  if ! kill -0 "$pid" 2>/dev/null; then
    wait "$pid" && status=0 || status=$?
    break
  fi
  sleep 0.2
done
[ -n "$status" ] || { echo "creditd did not stop within 30 s"; exit 1; }
pid=""

echo
echo "## results ($(nproc) cores, wrk -t$THREADS, $DURATION each, latency in microseconds)"
echo "| form      | conn |      req/s |  p50 us |  p90 us |  p99 us | p99.9 us |   2xx by wrk |   used delta | >=400 |"
echo "| --------- | ---- | ---------- | ------- | ------- | ------- | -------- | ------------ | ------------ | ---- |"
printf '%s\n' "${results[@]}"
echo
echo "purchased=$purchased total_credits=$total used=$used_now"
echo "allowed debits counted by creditd (metrics): $counted; 2xx read by wrk: $total_ok; warm-up debits: $warm"
fail=0
[ "$fail_runs" = 0 ] || fail=1
if [ "$purchased" -eq $(( total + used_now )) ]; then
  echo "conservation: purchased == total_credits + used: OK"
else
  echo "conservation: BROKEN ($purchased != $total + $used_now)"; fail=1
fi
if [ "$used_now" -eq "$counted" ]; then
  echo "used == allowed debits counted by creditd: OK"
else
  echo "used ($used_now) != allowed debits counted by creditd ($counted)"; fail=1
fi
if [ "$used_now" -ge $(( total_ok + warm )) ]; then
  echo "used - (2xx read by wrk + warm-up) = $(( used_now - total_ok - warm )) (answered, not read before wrk stopped)"
else
  echo "used ($used_now) < 2xx read by wrk + warm-up ($(( total_ok + warm ))): over-count"; fail=1
fi
echo "creditd exit status after SIGTERM: $status"
[ "$status" = 0 ] || fail=1
exit "$fail"
