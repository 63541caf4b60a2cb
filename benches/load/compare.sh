#!/usr/bin/env bash
# creditd against a bare hyper 1 server (benches/load/bare.rs), side by side in one run
# (issue #14). Builds release (creditd and the `bare` example), starts bare and one creditd per
# binary on free loopback ports, seeds each creditd like run.sh (budget org, 10^15 credits on
# ws-a), then:
#
# 1. closed loop, ROUNDS rounds, alternating within each round:
#      bare debit.lua, each creditd debit.lua, bare authorize.lua, each creditd authorize.lua
#    recording wrk's req/s and p99, and each server's CPU per request: the utime + stime
#    delta of its process (/proc/PID/stat, clock ticks) over the run, divided by the requests
#    wrk counted. The ratio of a creditd figure is against bare's in the same round.
# 2. open loop, for each RATE (default: 5000, 20000 and 0.9x bare's median debit req/s from
#    step 1), OHA_ROUNDS rounds alternating bare and each creditd:
#      oha -q RATE --latency-correction -z OHA_DURATION -c OHA_CONNS, POST /v1/debit
#    recording p50/p99 and the success rate.
#
# Then prints one table per step (medians over rounds, and the median of the per-round
# ratios) and stops everything (trap).
#
# Usage: benches/load/compare.sh [CREDITD_BIN...]
#   No argument: $CARGO_TARGET_DIR/release/creditd (built here). Several binaries (e.g. a copy
#   of the previous build and the new one) are measured side by side, labelled c1, c2, ...
# Env: ROUNDS (5), DURATION (8s), THREADS (2), CONNS (32), OHA_ROUNDS (3), OHA_DURATION (10s),
#      OHA_CONNS (32), RATES (default "5000 20000 max90"; max90 = 0.9x bare's max), SKIP_BUILD=1,
#      SKIP_OHA=1, OUT (a folder for the raw results; default a temporary one, printed).
# Needs cargo, wrk, curl, jq, python3, and oha (`cargo install oha`) unless SKIP_OHA=1.
# Talks only to 127.0.0.1. Every step is bounded by a timeout; servers are killed on exit.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="${CARGO_TARGET_DIR:-$repo/target}"
ROUNDS="${ROUNDS:-5}"
DURATION="${DURATION:-8s}"
THREADS="${THREADS:-2}"
CONNS="${CONNS:-32}"
OHA_ROUNDS="${OHA_ROUNDS:-3}"
OHA_DURATION="${OHA_DURATION:-10s}"
OHA_CONNS="${OHA_CONNS:-32}"
RATES="${RATES:-5000 20000 max90}"
ORG=bench
WS=ws-a
PURCHASE=1000000000000000
tick="$(getconf CLK_TCK)"

tools="cargo wrk curl jq python3"
[ "${SKIP_OHA:-0}" = 1 ] || tools="$tools oha"
for tool in $tools; do
  command -v "$tool" >/dev/null || { echo "compare.sh: $tool is required" >&2; exit 2; }
done

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "## build: cargo build --release --bin creditd --example bare"
  (cd "$repo" && timeout 1800 cargo build --release --bin creditd --example bare)
fi
bare_bin="$target/release/examples/bare"
[ -x "$bare_bin" ] || { echo "compare.sh: no $bare_bin" >&2; exit 2; }
bins=("$@")
[ "${#bins[@]}" -gt 0 ] || bins=("$target/release/creditd")
for b in "${bins[@]}"; do [ -x "$b" ] || { echo "compare.sh: no $b" >&2; exit 2; }; done

out="${OUT:-$(mktemp -d -t creditd-compare.XXXXXX)}"
mkdir -p "$out"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_ready() { # URL PID
  local i
  for i in $(seq 1 150); do
    curl -fsS -m 1 -o /dev/null "$1" 2>/dev/null && return 0
    kill -0 "$2" 2>/dev/null || { echo "server $2 exited" >&2; return 1; }
    [ "$i" = 150 ] && { echo "not ready within 30 s: $1" >&2; return 1; }
    sleep 0.2
  done
}
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

echo "## machine: $(nproc) cores, load average $(cut -d' ' -f1-3 /proc/loadavg); raw results in $out"

# Servers: names[i], urls[i], spids[i]. Index 0 is bare.
names=(); urls=(); spids=()
port="$(free_port)"
"$bare_bin" "127.0.0.1:$port" >"$out/bare.out" 2>&1 &
pids+=($!); names+=(bare); urls+=("http://127.0.0.1:$port"); spids+=($!)
wait_ready "http://127.0.0.1:$port/" "$!"

token="load-$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')"
i=0
for b in "${bins[@]}"; do
  i=$(( i + 1 ))
  port="$(free_port)"
  base="http://127.0.0.1:$port"
  CREDITD_LISTEN="127.0.0.1:$port" CREDITD_DATA_DIR="$out/c$i-db" CREDITD_ADMIN_TOKEN="$token" \
    "$b" serve >"$out/c$i.out" 2>"$out/c$i.log" &
  pids+=($!); names+=("c$i"); urls+=("$base"); spids+=($!)
  wait_ready "$base/readyz" "$!"
  admin() {
    curl -fsS -m 30 -X "$1" -H "Authorization: Bearer $token" \
      -H 'Content-Type: application/json' ${3:+--data "$3"} "$base$2" >/dev/null
  }
  admin POST /v1/orgs "{\"org\":\"$ORG\",\"mode\":\"budget\"}"
  admin POST "/v1/orgs/$ORG/credits" "{\"amount\":$PURCHASE}"
  admin POST "/v1/orgs/$ORG/workspaces" "{\"workspace\":\"$WS\"}"
  admin POST "/v1/orgs/$ORG/transfers" "{\"from\":\"primary\",\"to\":\"$WS\",\"amount\":$PURCHASE}"
  echo "## c$i = $b ($(sha256sum "$b" | cut -c1-12)) on $base: $(curl -fsS -m 5 \
    -H 'Content-Type: application/json' --data "{\"org\":\"$ORG\",\"workspace\":\"$WS\",\"amount\":1}" \
    "$base/v1/debit")"
done
echo "## bare = $bare_bin on ${urls[0]}: $(curl -fsS -m 5 --data '{}' "${urls[0]}/v1/debit")"

# One wrk run: SERVER_INDEX FORM ROUND -> a line in $out/wrk.tsv
wrk_run() {
  local s="$1" form="$2" round="$3" pid="${spids[$1]}"
  local t0 t1 res line
  t0="$(cpu_ticks "$pid")"
  res="$(LOAD_ORG=$ORG LOAD_WS=$WS timeout "$(( ${DURATION%s} + 30 ))" \
    wrk -t"$THREADS" -c"$CONNS" -d"$DURATION" --timeout 5s -s "$here/$form.lua" "${urls[$s]}")"
  t1="$(cpu_ticks "$pid")"
  line="$(echo "$res" | grep '^RESULT')"
  val() { echo "$line" | tr ' ' '\n' | awk -F= -v k="$1" '$1 == k { print $2 }'; }
  local reqs dur bad
  reqs="$(val requests)"; dur="$(val duration_us)"; bad="$(val bad_status)"
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$round" "$form" "${names[$s]}" "$reqs" "$dur" \
    "$(( t1 - t0 ))" "$(val p99_us)" "$bad" >>"$out/wrk.tsv"
  awk -v n="$reqs" -v us="$dur" -v t="$(( t1 - t0 ))" -v hz="$tick" -v name="${names[$s]}" \
    -v form="$form" -v r="$round" -v bad="$bad" -v la="$(cut -d' ' -f1 /proc/loadavg)" \
    'BEGIN { printf "   round %d %-9s %-4s %8.0f req/s  %5.2f us CPU/req  (status>=400: %d; load %s)\n",
      r, form, name, n / (us / 1e6), t * 1e6 / hz / n, bad, la }'
}

echo "## closed loop: wrk -t$THREADS -c$CONNS -d$DURATION, $ROUNDS rounds"
printf 'round\tform\tserver\trequests\tduration_us\tcpu_ticks\tp99_us\tbad_status\n' >"$out/wrk.tsv"
for round in $(seq 1 "$ROUNDS"); do
  for form in debit authorize; do
    for s in $(seq 0 $(( ${#names[@]} - 1 ))); do
      wrk_run "$s" "$form" "$round"
    done
  done
done

summary_wrk() {
  python3 - "$out/wrk.tsv" "$tick" <<'EOF'
import csv, statistics as st, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
hz = int(sys.argv[2])
by = {}
for r in rows:
    n = int(r["requests"]); us = int(r["duration_us"])
    by[(r["round"], r["form"], r["server"])] = dict(
        rps=n / (us / 1e6), cpu=int(r["cpu_ticks"]) * 1e6 / hz / n, p99=int(r["p99_us"]),
        bad=int(r["bad_status"]))
servers = sorted({k[2] for k in by}, key=lambda s: (s != "bare", s))
print("| form | server | req/s (median) | CPU us/req (median) | p99 us (median) | req/s / bare (median of rounds) | CPU / bare (median of rounds) | status>=400 |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for form in ["debit", "authorize"]:
    for s in servers:
        keys = [k for k in by if k[1] == form and k[2] == s]
        rps = st.median(by[k]["rps"] for k in keys)
        cpu = st.median(by[k]["cpu"] for k in keys)
        p99 = st.median(by[k]["p99"] for k in keys)
        bad = sum(by[k]["bad"] for k in keys)
        if s == "bare":
            rr = cr = "1"
        else:
            ratios = [by[k]["rps"] / by[(k[0], form, "bare")]["rps"] for k in keys]
            cratios = [by[k]["cpu"] / by[(k[0], form, "bare")]["cpu"] for k in keys]
            rr = "%.3f (%s)" % (st.median(ratios), " ".join("%.2f" % x for x in ratios))
            cr = "%.3f (%s)" % (st.median(cratios), " ".join("%.2f" % x for x in cratios))
        print(f"| {form} | {s} | {rps:,.0f} | {cpu:.2f} | {p99} | {rr} | {cr} | {bad} |")
    if form == "debit":
        bare = st.median(by[k]["rps"] for k in by if k[1] == form and k[2] == "bare")
        open(sys.argv[1] + ".bare_debit_rps", "w").write("%d\n" % bare)
EOF
}
summary_wrk | tee "$out/wrk.md"

if [ "${SKIP_OHA:-0}" != 1 ]; then
  max="$(cat "$out/wrk.tsv.bare_debit_rps")"
  body="{\"org\":\"$ORG\",\"workspace\":\"$WS\",\"amount\":1}"
  printf 'rate\tround\tserver\tsuccess\tp50_s\tp99_s\trps\n' >"$out/oha.tsv"
  echo "## open loop: oha -q RATE --latency-correction -z $OHA_DURATION -c $OHA_CONNS, POST /v1/debit, $OHA_ROUNDS rounds"
  for rate in $RATES; do
    [ "$rate" = max90 ] && rate=$(( max * 9 / 10 ))
    for round in $(seq 1 "$OHA_ROUNDS"); do
      for s in $(seq 0 $(( ${#names[@]} - 1 ))); do
        timeout "$(( ${OHA_DURATION%s} + 60 ))" oha --no-tui --output-format json \
          -q "$rate" --latency-correction -z "$OHA_DURATION" -c "$OHA_CONNS" -m POST \
          -H 'Content-Type: application/json' -d "$body" "${urls[$s]}/v1/debit" \
          >"$out/oha-$rate-$round-${names[$s]}.json"
        jq -r --arg rate "$rate" --arg round "$round" --arg s "${names[$s]}" \
          '[$rate, $round, $s, .summary.successRate, .latencyPercentiles.p50, .latencyPercentiles.p99, .summary.requestsPerSec] | @tsv' \
          "$out/oha-$rate-$round-${names[$s]}.json" | tee -a "$out/oha.tsv"
      done
    done
  done
  python3 - "$out/oha.tsv" <<'EOF' | tee "$out/oha.md"
import csv, statistics as st, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
by = {(r["rate"], r["round"], r["server"]): r for r in rows}
servers = sorted({k[2] for k in by}, key=lambda s: (s != "bare", s))
print("| rate | server | p50 us (median) | p99 us (median) | p99 / bare (median of rounds) | success (min) |")
print("| ---: | --- | ---: | ---: | ---: | ---: |")
for rate in sorted({k[0] for k in by}, key=int):
    for s in servers:
        keys = [k for k in by if k[0] == rate and k[2] == s]
        p50 = st.median(float(by[k]["p50_s"]) * 1e6 for k in keys)
        p99 = st.median(float(by[k]["p99_s"]) * 1e6 for k in keys)
        succ = min(float(by[k]["success"]) for k in keys)
        if s == "bare":
            r = "1"
        else:
            ratios = [float(by[k]["p99_s"]) / float(by[(k[0], k[1], "bare")]["p99_s"]) for k in keys]
            r = "%.3f (%s)" % (st.median(ratios), " ".join("%.2f" % x for x in ratios))
        print(f"| {rate} | {s} | {p50:.0f} | {p99:.0f} | {r} | {succ:.4f} |")
EOF
fi
for s in $(seq 0 $(( ${#names[@]} - 1 ))); do
  echo "## ${names[$s]}: $(grep VmRSS "/proc/${spids[$s]}/status" | tr -s ' \t' ' ')"
done
echo "## done; load average $(cut -d' ' -f1-3 /proc/loadavg); raw results in $out"
