"""The protocol's Lua scripts: each makes one multi-key step atomic and answers in one reply."""

from kiosk_protocol.keys import DEAD_LETTER_MAX, DEAD_LETTER_PREFIX

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
# failed, timestamp, announce ('1'/'0'), and optionally the longest allowed field value
# (bytes; '0' or absent: no limit) followed by the fields exempt from it.
# Replies: {0} no such job hash, {1, status} finished, {2, hash, status} started,
# {3, type} not a hash at all (WRONGTYPE; nothing written), {4, field, bytes} a field is
# longer than the limit (nothing written; checked before any work), {5, takes} the job was
# already taken ``takes`` times, the most allowed (poison pill: its workers died on it).
# Attempts: with ARGV[6] '1' every take increments the hash field 'attempts'. The LAST
# ARGV is the attempt limit ('0' = none; JobStore.start always sends it, after the field
# limit and its exempt fields, which are then ARGV[8 .. #ARGV-1]).
START = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'none' then return {0} end
if kind ~= 'hash' then return {3, kind} end
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {0} end
if status == ARGV[3] or status == ARGV[4] then return {1, status} end
local max_attempts = tonumber(ARGV[#ARGV]) or 0
local limit = tonumber(ARGV[7] or '0') or 0
if limit > 0 then
  local exempt = {}
  for i = 8, #ARGV - 1 do exempt[ARGV[i]] = true end
  for _, name in ipairs(redis.call('HKEYS', KEYS[1])) do
    if #name > limit then return {4, string.sub(name, 1, 64), #name} end
    if not exempt[name] then
      local size = redis.call('HSTRLEN', KEYS[1], name)
      if size > limit then return {4, name, size} end
    end
  end
end
if ARGV[6] == '1' then
  local taken = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') or 0
  if max_attempts > 0 and taken >= max_attempts then return {5, taken} end
  redis.call('HINCRBY', KEYS[1], 'attempts', 1)
  redis.call('HSET', KEYS[1], 'status', ARGV[2], 'identity_started', ARGV[1],
             'updated_at', ARGV[5], 'updated_by', ARGV[1])
end
return {2, redis.call('HGETALL', KEYS[1]), status}
"""

# A take that ended without its worker dying (graceful give-back, a consumer putting its
# job back to wait) does not count: 'attempts' goes down by one, never below zero.
# KEYS = job hash. Returns the attempts left counted.
FORGIVE_ATTEMPT = """
local taken = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0') or 0
if taken <= 0 then return 0 end
return redis.call('HINCRBY', KEYS[1], 'attempts', -1)
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

# Reclaim one stranded item exactly once: finished jobs are only removed, items that are
# not job hashes go to the dead-letter list of the queue (keys.dead_letter_key), others go
# to the front of their queue. Returns 0 (someone else took it), 1 (requeued), 2 (dropped, already finished) or
# 3 (dead-lettered). KEYS = processing list, queue; ARGV = item.
RECLAIM = f"""
local removed = redis.call('LREM', KEYS[1], 1, ARGV[1])
if removed == 0 then return 0 end
local kind = redis.call('TYPE', ARGV[1])['ok']
if kind ~= 'hash' and kind ~= 'none' then
  local dead = '{DEAD_LETTER_PREFIX}' .. KEYS[2]
  redis.call('LPUSH', dead, ARGV[1])
  redis.call('LTRIM', dead, 0, {DEAD_LETTER_MAX - 1})
  return 3
end
local status = redis.call('HGET', ARGV[1], 'status')
if status == 'done' or status == 'failed' then return 2 end
redis.call('RPUSH', KEYS[2], ARGV[1])
return 1
"""

# Move a held item that is not a job hash from a processing list to a dead-letter list
# (newest kept, DEAD_LETTER_MAX at most), if the list still holds it. KEYS = processing list,
# dead-letter list; ARGV = item. Returns 1 if moved, 0 if it was no longer held.
DEAD_LETTER = f"""
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
redis.call('LPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], 0, {DEAD_LETTER_MAX - 1})
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
