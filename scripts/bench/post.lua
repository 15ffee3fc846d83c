-- wrk script for scripts/bench.py: POST one JSON body with the benchmark's headers, then print
-- one machine-readable line with the counts and latency percentiles (microseconds).
--
-- Configured through the environment (wrk passes no options to a script's top level):
--   BENCH_BODY_FILE   file holding the request body (sent as is, Content-Type application/json)
--   BENCH_KEY         API key sent as "Authorization: Bearer <key>"
--   BENCH_MODE        value of X-Bench-Mode, which tells the mock upstream what to answer
--   BENCH_STOP_AFTER  seconds after which each connection, once its current request has been
--                     answered, sends an unfinished request head and goes idle until wrk exits
--                     (run wrk a second longer): no call is cut off at the end, so every call
--                     that reached the gate completed, and the records can be counted exactly.
--                     Unset or 0: load until wrk stops (as plain wrk does).
-- The request is formatted once; request() returns the same string each time, so the Lua cost
-- per request is one call and a clock read, the same for every configuration.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local CLOCK_MONOTONIC = 1

local function now()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end

local function slurp(path)
  local f = assert(io.open(path, "rb"), "cannot open BENCH_BODY_FILE " .. tostring(path))
  local data = f:read("*a")
  f:close()
  return data
end

wrk.method = "POST"
wrk.body = slurp(os.getenv("BENCH_BODY_FILE"))
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "")
wrk.headers["X-Bench-Mode"] = os.getenv("BENCH_MODE") or "plain"

local stop_after = tonumber(os.getenv("BENCH_STOP_AFTER") or "0") or 0
local req = nil
local stop_at = nil
-- An unfinished request head (no blank line): the server waits for the rest, writes no log line
-- and makes no call; wrk closes the connection when it exits.
local idle = "GET /bench-idle HTTP/1.1\r\nHost: bench\r\n"

function init(args)
  req = wrk.format()
  if stop_after > 0 then
    stop_at = now() + stop_after
  end
end

function request()
  if stop_at ~= nil and now() >= stop_at then
    return idle
  end
  return req
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH requests=%d duration_us=%d bytes=%d connect_errors=%d read_errors=%d " ..
    "write_errors=%d status_errors=%d timeouts=%d p50_us=%d p90_us=%d p99_us=%d " ..
    "mean_us=%.1f max_us=%d\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
