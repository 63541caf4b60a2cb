-- wrk script: GET /v1/authorize, the forward-auth form: org, workspace and amount (1) in
-- headers, no body. Env: LOAD_ORG, LOAD_WS (defaults: bench, ws-a).
-- Prints one machine-readable RESULT line at the end (read by run.sh).
local org = os.getenv("LOAD_ORG") or "bench"
local ws = os.getenv("LOAD_WS") or "ws-a"

wrk.method = "GET"
wrk.path = "/v1/authorize"
wrk.headers["X-Credits-Org"] = org
wrk.headers["X-Credits-Workspace"] = ws
wrk.headers["X-Credits-Amount"] = "1"

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d bad_status=%d connect=%d read=%d write=%d timeout=%d " ..
    "p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
