-- wrk script: POST /serves/{serve_id}/outcome {"status":200}, each serve id of a file once.
-- Usage: wrk -s bench/report.lua URL -- SERVE_ID_FILE THREADS. Thread n takes every n-th id of
-- the file (one per line), in file order, and stops once every one of its ids is answered.
-- (Its other connections may send the last id again meanwhile: at most one repeat each.)
local thread_count = 0
function setup(thread)
  thread:set("tid", thread_count)
  thread_count = thread_count + 1
end

local ids, next_id, answered = {}, 1, 0
function init(args)
  local path, threads = args[1], tonumber(args[2])
  local i = 0
  for line in io.lines(path) do
    if line ~= "" and i % threads == tid then
      ids[#ids + 1] = line
    end
    i = i + 1
  end
  wrk.method = "POST"
  wrk.body = '{"status":200}'
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  local id = ids[math.min(next_id, #ids)]
  next_id = next_id + 1
  return wrk.format(nil, "/serves/" .. id .. "/outcome")
end

function response(status, headers, body)
  answered = answered + 1
  if answered >= #ids then
    wrk.thread:stop()
  end
end
