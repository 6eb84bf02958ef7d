//! The Lua scripts the tier runs: on a cluster, marks and lookups as one
//! request per batch (one reply: the cluster client's pipelines wait out a
//! timeout per command when a server stalls); everywhere, the shared-mode
//! claim and the compaction of record strings.

/// On a cluster, writes marks into many hashes in one request (one reply:
/// the cluster client's pipeline of one command per hash would wait out a
/// timeout per command when a server stalls). KEYS: the hashes. ARGV: ttl
/// ms, then per hash: its number of marks `n`, `1` to give it the TTL
/// (else `0`), `n` pairs (fingerprint, time). Arguments go to `HSET` in
/// runs of 500 marks that fit Lua's stack. Returns per hash how many of
/// its marks are stored (the runs before the first one Redis refused: out
/// of memory, no permission), then the first refusal's message if any.
pub(super) const MARK_SCRIPT: &str = r"
local ttl = ARGV[1]
local out, refusal = {}, nil
local i = 2
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  local expire = ARGV[i + 1] == '1'
  local j, last = i + 2, i + 1 + 2 * n
  local stored = 0
  while j <= last do
    local e = math.min(j + 999, last)
    local r = redis.pcall('HSET', KEYS[k], unpack(ARGV, j, e))
    if type(r) == 'table' and r.err then
      refusal = refusal or r.err
      break
    end
    stored = stored + (e - j + 1) / 2
    j = e + 1
  end
  if expire and stored > 0 then
    redis.pcall('PEXPIRE', KEYS[k], ttl)
  end
  out[k] = stored
  i = last + 1
end
if refusal then
  out[#KEYS + 1] = refusal
end
return out
";

/// On a cluster, appends marks to many record strings in one request (one
/// reply, as [`MARK_SCRIPT`]). KEYS: the strings. ARGV: ttl ms, then per
/// string: its records (24 bytes each), `1` to give it the TTL (else `0`).
/// Returns per string how many records it stored (all or none), then the
/// first refusal's message if any.
pub(super) const APPEND_SCRIPT: &str = r"
local ttl = ARGV[1]
local out, refusal = {}, nil
for k = 1, #KEYS do
  local r = redis.pcall('APPEND', KEYS[k], ARGV[2 * k])
  if type(r) == 'table' and r.err then
    refusal = refusal or r.err
    out[k] = 0
  else
    out[k] = #ARGV[2 * k] / 24
    if ARGV[2 * k + 1] == '1' then
      redis.pcall('PEXPIRE', KEYS[k], ttl)
    end
  end
end
if refusal then
  out[#KEYS + 1] = refusal
end
return out
";

/// Rewrites record strings of a finished slice at their exact size: `APPEND`
/// grows a string by doubling, so a string written over many flushes holds
/// up to twice its bytes (46 against 30 bytes per key at 10⁷ keys in the
/// Redis bench). Same bytes, same TTL (`KEEPTTL`, Redis ≥ 6.0); absent keys
/// and other types are skipped (`pcall`: a compaction never fails the
/// marks it travels with). KEYS: the strings.
pub(super) const COMPACT_SCRIPT: &str = r"
for _, k in ipairs(KEYS) do
  local v = redis.pcall('GET', k)
  if type(v) == 'string' then
    redis.pcall('SET', k, v, 'KEEPTTL')
  end
end
return #KEYS
";

/// Reads many hashes in one request (one reply, as [`MARK_SCRIPT`]). KEYS:
/// the hashes. ARGV: per hash, its number of fields `n`, then the `n`
/// fields. Returns every value in order (nil where absent).
pub(super) const LOOKUP_SCRIPT: &str = r"
local out = {}
local i = 1
for k = 1, #KEYS do
  local n = tonumber(ARGV[i])
  local j, last = i + 1, i + n
  while j <= last do
    local e = math.min(j + 999, last)
    local values = redis.call('HMGET', KEYS[k], unpack(ARGV, j, e))
    for v = 1, e - j + 1 do
      out[#out + 1] = values[v]
    end
    j = e + 1
  end
  i = last + 1
end
return out
";

/// Claims keys atomically. KEYS: per bucket the claims use, the live slice
/// hashes of that bucket, newest (current) first. ARGV: ttl ms (`0`: the
/// hashes get none), the number
/// of live slices `L`, then per key: the offset of its bucket's hashes in
/// KEYS, fingerprint, time (8 bytes BE), threshold (8 bytes BE: the oldest
/// first-accepted time still inside the window, or 0 without one). Returns
/// per key the stored time (a duplicate) or `false` (recorded now). Times
/// are compared as two 32-bit halves: Lua numbers are doubles. Redis is
/// asked in bulk — one `HMGET` per live slice (newest first, only for keys
/// no newer slice holds) and one `HSET` per bucket — since a Redis call
/// from Lua costs about a microsecond: a call per key and slice made
/// shared mode 126 thousand keys/s at 10⁷ keys.
pub(super) const CLAIM_SCRIPT: &str = r"
local ttl = tonumber(ARGV[1])
local live = tonumber(ARGV[2])
local n = (#ARGV - 2) / 4
-- Claim j's arguments: base ARGV[4j - 1], fingerprint ARGV[4j], time
-- ARGV[4j + 1], threshold ARGV[4j + 2]. Claims by bucket (its base).
local groups, bases = {}, {}
for j = 1, n do
  local b = tonumber(ARGV[4 * j - 1])
  local g = groups[b]
  if not g then
    g = {}
    groups[b] = g
    bases[#bases + 1] = b
  end
  g[#g + 1] = j
end
-- The newest stored time of each claim's key: one HMGET per live slice
-- (newest first) for the keys not found in a newer one.
local stored = {}
for _, b in ipairs(bases) do
  local pending = groups[b]
  for k = b + 1, b + live do
    if #pending == 0 then
      break
    end
    local still = {}
    local s = 1
    while s <= #pending do
      local e = math.min(s + 999, #pending)
      local fields = {}
      for q = s, e do
        fields[#fields + 1] = ARGV[4 * pending[q]]
      end
      local values = redis.call('HMGET', KEYS[k], unpack(fields))
      for q = s, e do
        local v = values[q - s + 1]
        if v then
          stored[pending[q]] = v
        else
          still[#still + 1] = pending[q]
        end
      end
      s = e + 1
    end
    pending = still
  end
end
-- In order: a key is inside the window if its newest time (a copy
-- claimed earlier in this batch counts) reaches the threshold.
local out, claimed, writes = {}, {}, {}
for j = 1, n do
  local fp, at, threshold = ARGV[4 * j], ARGV[4 * j + 1], ARGV[4 * j + 2]
  local v = claimed[fp] or stored[j]
  local found = false
  if v then
    local th_hi, th_lo = struct.unpack('>I4>I4', threshold)
    local hi, lo = struct.unpack('>I4>I4', v)
    if hi > th_hi or (hi == th_hi and lo >= th_lo) then
      found = v
    end
  end
  out[j] = found
  if not found then
    claimed[fp] = at
    local b = tonumber(ARGV[4 * j - 1])
    local w = writes[b]
    if not w then
      w = {}
      writes[b] = w
    end
    w[#w + 1] = fp
    w[#w + 1] = at
  end
end
for b, w in pairs(writes) do
  local s = 1
  while s <= #w do
    local e = math.min(s + 999, #w)
    redis.call('HSET', KEYS[b + 1], unpack(w, s, e))
    s = e + 1
  end
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[b + 1], ttl)
  end
end
return out
";
