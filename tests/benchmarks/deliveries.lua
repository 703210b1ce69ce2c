-- wrk script: every request is a unique, signed Tencent-style after-create delivery.
-- QUERY (already signed, valid for the run) comes from the environment.
local counter = 0
local query = os.getenv("QUERY") or ""
local thread_id = 0
setup = function(thread)
  thread:set("tid", thread_id)
  thread_id = thread_id + 1
end
request = function()
  counter = counter + 1
  local topic = "@TGS#_bench@TOPIC#_" .. tid .. "_" .. counter .. "_" .. os.time()
  local body = '{"CallbackCommand":"Group.CallbackAfterCreateTopic","GroupId":"@TGS#_bench","TopicId":"' .. topic ..
    '","Operator_Account":"group_root","Owner_Account":"leckie","Type":"Community","Name":"MyFirstTopic",' ..
    '"UserDefinedDataList":[{"Key":"UserDefined1","Value":"hello"},{"Key":"UserDefined2","Value":"world"}]}'
  return wrk.format("POST", "/callback?" .. query, {["Content-Type"] = "application/json"}, body)
end
-- DELAY_MS paces each connection (a steady rate: connections x 1000 / (DELAY_MS + latency) per second).
local pause = tonumber(os.getenv("DELAY_MS") or "0")
if pause > 0 then
  delay = function()
    return pause
  end
end
