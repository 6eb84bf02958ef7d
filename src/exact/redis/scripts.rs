//! The Lua scripts the tier runs: on a cluster, marks and lookups as one
//! request per batch (one reply: the cluster client's pipelines wait out a
//! timeout per command when a server stalls); everywhere, the shared-mode
//! log and the compaction of record strings.

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

/// Shared keys: one batch of a shard's operations appended to its log,
/// and the log read back from where the caller stopped (see `log.rs`).
/// KEYS: the log (a stream), its epoch (a string naming this stream's
/// life: a log lost with its server gets a new one, and every replica
/// rebuilds), then the body hashes this batch writes. ARGV: the epoch to
/// set if there is none, ttl ms (`0`: none), the id to read after
/// (exclusive: `(0-<seq>`), the most entries to return, the id to trim
/// before (`''`: none), the number of entries `n`, the `n` entries, then
/// per body hash: its index in KEYS, its number of fields `m`, and `m`
/// pairs (field, result). Bodies are written before the commits that name
/// them, so a reader that sees a commit finds its result. Returns the
/// epoch, the ids of the entries appended (`0-*`: the sequence counts
/// entries), and the entries read (`XRANGE` replies).
pub(super) const LOG_SCRIPT: &str = r"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[6])
local i = 7 + n
while i <= #ARGV do
  local k, m = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local j, last = i + 2, i + 1 + 2 * m
  while j <= last do
    local e = math.min(j + 999, last)
    redis.call('HSET', KEYS[k], unpack(ARGV, j, e))
    j = e + 1
  end
  i = last + 1
end
local ids = {}
for b = 1, n do
  ids[b] = redis.call('XADD', KEYS[1], '0-*', 'o', ARGV[6 + b])
end
if ttl > 0 and n > 0 then
  for k = 1, #KEYS do
    redis.call('PEXPIRE', KEYS[k], ttl)
  end
end
if ARGV[5] ~= '' then
  redis.call('XTRIM', KEYS[1], 'MINID', ARGV[5])
end
local entries = redis.call('XRANGE', KEYS[1], ARGV[3], '+', 'COUNT', ARGV[4])
return {epoch, ids, entries}
";
