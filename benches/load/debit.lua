-- wrk script: POST /v1/debit with a JSON body, amount 1, on one org/workspace.
-- Env: LOAD_ORG, LOAD_WS (defaults: bench, ws-a).
-- Prints one machine-readable RESULT line at the end (read by run.sh).
local org = os.getenv("LOAD_ORG") or "bench"
local ws = os.getenv("LOAD_WS") or "ws-a"

wrk.method = "POST"
wrk.path = "/v1/debit"
wrk.headers["Content-Type"] = "application/json"
wrk.body = string.format('{"org":"%s","workspace":"%s","amount":1}', org, ws)

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "RESULT requests=%d duration_us=%d bad_status=%d connect=%d read=%d write=%d timeout=%d " ..
    "p50_us=%d p90_us=%d p99_us=%d p999_us=%d max_us=%d\n",
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
