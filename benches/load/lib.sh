# Shared by the load scripts (sourced, never run): a free loopback port, a throwaway
# redis-server, generated orgs.

# A free TCP port on 127.0.0.1.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# start_redis DIR LOG: a redis-server without persistence on a free loopback port, its files
# in DIR and its output in LOG. Sets REDIS_PORT and REDIS_PID (the caller stops it); returns
# once it answers PING, or fails after 10 s.
start_redis() {
  REDIS_PORT=$(free_port)
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$1" \
    >"$2" 2>&1 &
  REDIS_PID=$!
  for _ in $(seq 1 100); do
    redis-cli -p "$REDIS_PORT" PING >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "redis-server did not answer on port $REDIS_PORT" >&2
  return 1
}

# export_orgs FILE ORGS WORKSPACES: ORGS budget-mode orgs of WORKSPACES workspaces (1,000
# credits each; org-00000.., ws-000000..) written as an export, for `creditd import`
# (benches/cached_memory.rs, EXPORT_TO).
export_orgs() {
  EXPORT_TO="$1" ORGS="$2" WORKSPACES="$3" \
    timeout 1800 nice cargo bench --locked --bench cached_memory >/dev/null
}
