-- wrk script for benchmarks.serving: POSTs JSON bodies, one per line of $WRK_BODIES, in turn,
-- with `Authorization: Bearer $WRK_TOKEN` to $WRK_PATH. Requests are formatted once, up front,
-- so that wrk (which shares the CPUs with the server under test) spends little per request.
-- done() prints one line "WRK_JSON {...}" with the counts and latency percentiles (microseconds).

wrk.method = "POST"
wrk.path = os.getenv("WRK_PATH") or "/v1/predict"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("WRK_TOKEN") or "")

local requests = {}
local count = 0
local next_index = 0

function init(args)
  for line in io.lines(os.getenv("WRK_BODIES")) do
    if #line > 0 then
      count = count + 1
      requests[count] = wrk.format(nil, nil, nil, line)
    end
  end
  if count == 0 then
    error("no request bodies in " .. tostring(os.getenv("WRK_BODIES")))
  end
  next_index = math.random(count) - 1 -- threads start at different bodies
end

function request()
  next_index = next_index % count + 1
  return requests[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "mean_us": %.1f, "stdev_us": %.1f, '
      .. '"p50_us": %d, "p90_us": %d, "p99_us": %d, "p999_us": %d, "max_us": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}}\n',
    summary.requests, summary.duration, summary.bytes, latency.mean, latency.stdev,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
