-- wrk script: POST /serves/{serve_id}/outcome {"status":200}, each serve id once.
-- Usage: wrk -s bench/report.lua URL -- SERVE_ID_FILE THREADS. Thread n takes every n-th id of
-- the file (one per line); past its last id it starts over (then each report repeats one).
local thread_count = 0
function setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
end

local ids, next_id = {}, 1
function init(args)
  local path, threads = args[1], tonumber(args[2])
  local i = 0
  for line in io.lines(path) do
    if i % threads == tid then
      ids[#ids + 1] = line
    end
    i = i + 1
  end
  wrk.method = "POST"
  wrk.body = '{"status":200}'
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local id = ids[next_id]
  next_id = next_id % #ids + 1
  return wrk.format(nil, "/serves/" .. id .. "/outcome")
end
