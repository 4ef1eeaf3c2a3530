"""The protocol's Lua scripts: each makes one multi-key step atomic and answers in one reply."""

# Write a hash and push items, once: if the marker field already holds its value, an earlier
# attempt whose reply was lost did it all (redis-py retries commands on connection errors; a
# second LPUSH would queue the same job twice). KEYS = hash, queue; ARGV = marker field,
# marker value, number of items, items..., field, value, ...
PUSH_ONCE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 0 end
local n = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 4 + n))
if n > 0 then redis.call('LPUSH', KEYS[2], unpack(ARGV, 4, 3 + n)) end
return 1
"""

# Skip vanished or finished jobs, else mark started (unless ARGV[6] is '0') and return
# the hash and the status it had: one round trip. ARGV = worker, started status, done,
# failed, timestamp, announce ('1'/'0').
START = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0} end
if status == ARGV[3] or status == ARGV[4] then return {1, status} end
if ARGV[6] == '1' then
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'identity_started', ARGV[1],
             'updated_at', ARGV[5], 'updated_by', ARGV[1])
end
return {2, redis.call('HGETALL', KEYS[1]), status}
"""

# Put a job back where it will be taken next (the right end), or at the back of
# the line (left end), but only if this worker still holds it: LREM tells us.
REQUEUE = """
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed == 0 then return 0 end
if ARGV[2] == 'front' then
  redis.call('RPUSH', KEYS[2], ARGV[1])
else
  redis.call('LPUSH', KEYS[2], ARGV[1])
end
return 1
"""

# Reclaim one stranded item exactly once: finished jobs are only removed,
# others go to the front of their queue. Returns 0 (someone else took it),
# 1 (requeued) or 2 (dropped, already finished).
RECLAIM = """
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed == 0 then return 0 end
local status = redis.call('HGET', ARGV[1], 'status')
if status == 'done' or status == 'failed' then return 2 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""

# Final fields, drop from processing, expire: atomic like MULTI/EXEC but one command and
# one reply (the hottest write of a worker). ARGV[1] = expiry seconds (0 = keep),
# ARGV[2..] = field, value, ... Returns what the processing list still holds (0 normally).
FINISH = """
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('LREM', KEYS[2], 1, KEYS[1])
if tonumber(ARGV[1]) > 0 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end
return redis.call('LLEN', KEYS[2])
"""
