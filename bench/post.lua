-- wrk script: POST a small chat completion and write the results as JSON.
--
-- Environment: BENCH_AUTH (bearer key, optional), BENCH_BODY (request body,
-- optional), BENCH_OUT (path of the JSON written when the run is done).
-- Latencies are in microseconds, as wrk records them.

wrk.method = "POST"
wrk.body = os.getenv("BENCH_BODY")
    or '{"model":"bench-model","messages":[{"role":"user","content":"Hello!"}],"max_tokens":16}'
wrk.headers["Content-Type"] = "application/json"
local auth = os.getenv("BENCH_AUTH")
if auth ~= nil and auth ~= "" then
    wrk.headers["Authorization"] = "Bearer " .. auth
end

done = function(summary, latency, requests)
    local e = summary.errors
    local out = assert(io.open(os.getenv("BENCH_OUT"), "w"))
    out:write(string.format(
        '{"requests":%d,"duration_us":%d,"bytes":%d,' ..
        '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
        '"latency_us":{"min":%d,"mean":%.1f,"max":%d,"stdev":%.1f,"p50":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
        summary.requests, summary.duration, summary.bytes,
        e.connect, e.read, e.write, e.status, e.timeout,
        latency.min, latency.mean, latency.max, latency.stdev,
        latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
    out:close()
end
