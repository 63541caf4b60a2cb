#!/usr/bin/env bash
# User-space instructions per request, counted by valgrind's callgrind: deterministic, so two
# builds compare without the noise of a shared machine (issue #14). Kernel time (the socket
# calls, most of a request's CPU) is not counted.
#
# Usage: benches/load/callgrind.sh NAME BIN [N]
#   BIN is a creditd binary (started with `serve`, seeded like run.sh) or the `bare` example
#   (any binary whose name contains "bare"). After 200 warm-up requests of each form, counts N
#   (default 2000) sequential keep-alive requests of POST /v1/debit, then of GET /v1/authorize,
#   and prints instructions per request. The callgrind files stay in OUT (default a temporary
#   folder) for callgrind_annotate.
# Needs valgrind, curl, python3. Loopback only; every wait bounded; the server is killed on exit.
set -euo pipefail

name="$1"; bin="$2"; n="${3:-2000}"
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is required" >&2; exit 2; }
out="${OUT:-$(mktemp -d -t creditd-callgrind.XXXXXX)}"
mkdir -p "$out"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
base="http://127.0.0.1:$port"
vpid=""
trap '[ -n "$vpid" ] && kill -KILL "$vpid" 2>/dev/null || true' EXIT

case "$(basename "$bin")" in
  *bare*)
    valgrind --tool=callgrind --callgrind-out-file="$out/$name.%p.out" "$bin" "127.0.0.1:$port" \
      >"$out/$name.stdout" 2>"$out/$name.log" &
    ready="$base/" ;;
  *)
    CREDITD_LISTEN="127.0.0.1:$port" CREDITD_DATA_DIR="$out/$name-db" CREDITD_ADMIN_TOKEN=cg \
      valgrind --tool=callgrind --callgrind-out-file="$out/$name.%p.out" "$bin" serve \
      >"$out/$name.stdout" 2>"$out/$name.log" &
    ready="$base/readyz" ;;
esac
vpid=$!
for i in $(seq 1 240); do
  curl -fsS -m 2 -o /dev/null "$ready" 2>/dev/null && break
  kill -0 "$vpid" 2>/dev/null || { cat "$out/$name.log"; exit 1; }
  [ "$i" = 240 ] && { echo "not ready within 120 s" >&2; exit 1; }
  sleep 0.5
done
if [ "$ready" = "$base/readyz" ]; then
  admin() {
    curl -fsS -m 60 -X "$1" -H "Authorization: Bearer cg" -H 'Content-Type: application/json' \
      --data "$3" "$base$2" >/dev/null
  }
  admin POST /v1/orgs '{"org":"bench","mode":"budget"}'
  admin POST /v1/orgs/bench/credits '{"amount":1000000000000000}'
  admin POST /v1/orgs/bench/workspaces '{"workspace":"ws-a"}'
  admin POST /v1/orgs/bench/transfers '{"from":"primary","to":"ws-a","amount":1000000000000000}'
fi

drive() { # FORM COUNT
  timeout 600 python3 - "$port" "$2" "$1" <<'EOF'
import http.client, sys
port, n, form = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
body = '{"org":"bench","workspace":"ws-a","amount":1}'
for _ in range(n):
    if form == "debit":
        c.request("POST", "/v1/debit", body=body, headers={"Content-Type": "application/json"})
    else:
        c.request("GET", "/v1/authorize", headers={
            "X-Credits-Org": "bench", "X-Credits-Workspace": "ws-a", "X-Credits-Amount": "1"})
    r = c.getresponse()
    r.read()
    if r.status >= 400:
        sys.exit(f"status {r.status}")
EOF
}
drive debit 200
drive authorize 200
for form in debit authorize; do
  callgrind_control -z "$vpid" >/dev/null
  drive "$form" "$n"
  callgrind_control -d "$name-$form" "$vpid" >/dev/null
  sleep 1
  file="$(grep -l "^desc: Trigger: dump $name-$form\$" "$out/$name".*.out.* | tail -1)"
  total="$(awk '/^summary:/ { print $2 }' "$file")"
  echo "$name $form: $(( total / n )) instructions per request ($total for $n; $file)"
done
