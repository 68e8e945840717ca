-- wrk script: POST /serves/{serve_id}/outcome {"status":200}, each serve id of a file once.
-- Usage: wrk -s bench/report.lua URL -- SERVE_ID_FILE THREADS. Thread n takes every n-th id of
-- the file (one per line), in file order. Requests are built once in init() and `response` is
-- left nil, as wrk's own guide advises for a fast server: building a request per call and
-- handing every response to Lua cost wrk CPU that /health's plain run does not pay, and on
-- two shared cores that CPU is the server's. Past its last id a thread repeats it (answered
-- "same again"); bench.py flags a case whose count reached its ids (RAN OUT).
local thread_count = 0
function setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
end

local requests, next_id = {}, 1
function init(args)
  local path, threads = args[1], tonumber(args[2])
  wrk.method = "POST"
  wrk.body = '{"status":200}'
  wrk.headers["Content-Type"] = "application/json"
  local i = 0
  for line in io.lines(path) do
    if line ~= "" and i % threads == tid then
      requests[#requests + 1] = wrk.format(nil, "/serves/" .. line .. "/outcome")
    end
    i = i + 1
  end
end

function request()
  local r = requests[next_id] or requests[#requests]
  next_id = next_id + 1
  return r
end
