-- wrk script for bench/load.py: each connection is one dashboard poller with a real API key.
-- bench/load.py writes the targets (tenants, their keys, job ids, event positions) to the file named
-- by LOAD_TARGETS and reads the JSON this script writes to LOAD_RESULT.
--
-- A thread cycles through the dashboard's reads: the job list (first page), the next page (through
-- the last cursor this thread received for that tenant), one job, and that job's events after a
-- recent event id. LOAD_DELAY_MS > 0 makes each connection wait 0.5x-1.5x that long before each
-- request (a poll interval); 0 sends the next request as soon as the answer arrives (saturation).

local targets = dofile(os.getenv("LOAD_TARGETS"))
local delay_ms = tonumber(os.getenv("LOAD_DELAY_MS") or "0")
local threads = {}
local thread_count = 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_index", thread_count)
  table.insert(threads, thread)
end

local step = 0
local cursors = {}
statuses = {}

function init(args)
  math.randomseed(7919 * thread_index)
end

local function get(path, tenant)
  return wrk.format("GET", path, {["Authorization"] = "Bearer " .. tenant.key})
end

function request()
  step = step + 1
  local tenant = targets[math.random(#targets)]
  local kind = step % 4
  if kind == 0 then
    return get("/v1/jobs?limit=50", tenant)
  elseif kind == 1 then
    local cursor = cursors[tenant.name]
    return get(cursor and ("/v1/jobs?limit=50&cursor=" .. cursor) or "/v1/jobs?limit=50", tenant)
  elseif kind == 2 then
    return get("/v1/jobs/" .. tenant.jobs[math.random(#tenant.jobs)], tenant)
  end
  local logged = tenant.logged[math.random(#tenant.logged)]
  local after = math.max(0, logged[2] - math.random(0, 3))  -- a poll that finds 0-3 new events
  return get("/v1/jobs/" .. logged[1] .. "/events?after=" .. after, tenant)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  local cursor = body:match('"next_cursor":"([^"]+)"')
  if cursor then
    local tenant = body:match('"tenant":"([^"]+)"')
    if tenant then
      cursors[tenant] = cursor
    end
  end
end

if delay_ms > 0 then
  function delay()
    return math.floor(delay_ms * (0.5 + math.random()))
  end
end

function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[tostring(status)] = (counts[tostring(status)] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(counts) do
    table.insert(parts, string.format('"%s": %d', status, n))
  end
  local e = summary.errors
  local out = io.open(os.getenv("LOAD_RESULT"), "w")
  out:write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, "statuses": {%s}, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\n',
    summary.requests, summary.duration, summary.bytes, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
  out:close()
end
