-- wrk script: POST /v1/debit, amount 1, on a random workspace of a random org, out of the
-- ORGS x WORKSPACES that cached_memory's EXPORT_TO generates (org-00000.., ws-000000..).
-- Env: LOAD_ORGS, LOAD_WORKSPACES. Prints one RESULT line at the end.
local orgs = tonumber(os.getenv("LOAD_ORGS") or "100")
local workspaces = tonumber(os.getenv("LOAD_WORKSPACES") or "1000")
local headers = { ["Content-Type"] = "application/json" }

function setup(thread)
  thread:set("seed", math.random(1, 1000000000))
end

function init(args)
  math.randomseed(seed)
end

function request()
  local body = string.format('{"org":"org-%05d","workspace":"ws-%06d","amount":1}',
    math.random(0, orgs - 1), math.random(0, workspaces - 1))
  return wrk.format("POST", "/v1/debit", headers, body)
end

function done(summary, latency, requests)
  io.write(string.format("RESULT requests=%d bad_status=%d p50_us=%d p99_us=%d\n",
    summary.requests, summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
