//! The Lua scripts the tier runs: on a cluster, marks and lookups as one
//! request per batch (one reply: the cluster client's pipelines wait out a
//! timeout per command when a server stalls), and the shared-mode log;
//! everywhere, the shared mode's read of committed results and its
//! snapshots, and the compaction of record strings.

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
/// string: its records, `1` to give it the TTL (else `0`), and how many
/// records they are. Returns per string how many records it stored (all or
/// none), then the first refusal's message if any.
pub(super) const APPEND_SCRIPT: &str = r"
local ttl = ARGV[1]
local out, refusal = {}, nil
for k = 1, #KEYS do
  local r = redis.pcall('APPEND', KEYS[k], ARGV[3 * k - 1])
  if type(r) == 'table' and r.err then
    refusal = refusal or r.err
    out[k] = 0
  else
    out[k] = tonumber(ARGV[3 * k + 1])
    if ARGV[3 * k] == '1' then
      redis.pcall('PEXPIRE', KEYS[k], ttl)
    end
  end
end
if refusal then
  out[#KEYS + 1] = refusal
end
return out
";

/// Removes every record of one fingerprint from the buckets of the live
/// slices that may hold it (a forget, owned keys). KEYS: the buckets.
/// ARGV: the fingerprint (16 bytes), `1` for record strings (rewritten
/// without its records, same TTL), `0` for hashes (`HDEL`). Records are
/// walked as `records.rs` writes them: 24 bytes, and a body after those
/// whose time has its top bit set. Returns how many records went.
pub(super) const FORGET_SCRIPT: &str = r"
local fp = ARGV[1]
local removed = 0
for _, k in ipairs(KEYS) do
  if ARGV[2] == '1' then
    local v = redis.call('GET', k)
    if v then
      local kept, i, n, changed = {}, 1, #v, false
      while i <= n do
        local len = 24
        if string.byte(v, i + 16) >= 128 then
          local a, b, c, d = string.byte(v, i + 33, i + 36)
          len = 37 + ((a * 256 + b) * 256 + c) * 256 + d
        end
        if string.sub(v, i, i + 15) == fp then
          changed = true
          removed = removed + 1
        else
          kept[#kept + 1] = string.sub(v, i, i + len - 1)
        end
        i = i + len
      end
      if changed then
        if #kept == 0 then
          redis.call('DEL', k)
        else
          redis.call('SET', k, table.concat(kept), 'KEEPTTL')
        end
      end
    end
  else
    removed = removed + redis.call('HDEL', k, fp)
  end
end
return removed
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

/// Shared keys on a cluster: one batch of a shard's operations appended
/// to its log, and the log read back from where the caller stopped (see
/// `log.rs`), in one script (one reply: the cluster client sends no
/// pipelines).
/// KEYS: the log (a stream), its epoch (a string naming this stream's
/// life: a log lost with its server gets a new one, and every replica
/// rebuilds), then the body hashes this batch writes. ARGV: the epoch to
/// set if there is none, ttl ms (`0`: none), the id to read after
/// (exclusive: `(0-<seq>`), the most entries to return, the number of
/// entries `n`, the `n` entries, then per body hash: its index in KEYS,
/// its number of fields `m`, and `m` pairs (field, result). Bodies are
/// written before the commits that name them, so a reader that sees a
/// commit finds its result. Returns the epoch, the ids of the entries
/// appended (`0-*`: the sequence counts entries), and the entries read
/// (`XRANGE` replies).
pub(super) const CLUSTER_LOG_SCRIPT: &str = r"
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', KEYS[2], epoch)
end
local ttl = tonumber(ARGV[2])
local n = tonumber(ARGV[5])
local i = 6 + n
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
  ids[b] = redis.call('XADD', KEYS[1], '0-*', 'o', ARGV[5 + b])
end
if ttl > 0 and n > 0 then
  for k = 1, #KEYS do
    redis.call('PEXPIRE', KEYS[k], ttl)
  end
end
local entries = redis.call('XRANGE', KEYS[1], ARGV[3], '+', 'COUNT', ARGV[4])
return {epoch, ids, entries}
";

/// Shared keys: makes a snapshot of a shard's state (its replica as of an
/// entry of the log, whose parts were stored first) the one replicas
/// start from, and trims the log behind the previous one. KEYS: the
/// snapshot's pointer, the log. ARGV: the new pointer
/// (`<position>:<parts>:<id>:<generation>:<trim id>`), its generation,
/// ttl ms (`0`: none), the prefix of part keys (`…:snap:`), then the new
/// parts' keys. When the stored snapshot is of this generation or a later
/// one (another engine took it), deletes the new parts and returns 0;
/// otherwise sets the pointer, deletes the previous snapshot's parts,
/// trims the log before the previous snapshot's position (replicas up to
/// a snapshot behind still read on without a gap), and returns 1.
pub(super) const SNAPSHOT_SCRIPT: &str = r"
local old = redis.call('GET', KEYS[1])
local old_parts, old_id, trim = 0, nil, nil
if old then
  local n, id, generation, t = string.match(old, '^%d+:(%d+):(%w+):(%d+):(.+)$')
  if generation and tonumber(generation) >= tonumber(ARGV[2]) then
    for i = 5, #ARGV do
      redis.call('UNLINK', ARGV[i])
    end
    return 0
  end
  old_parts, old_id, trim = tonumber(n or 0), id, t
end
if tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
if old_id then
  for i = 1, old_parts do
    redis.call('UNLINK', ARGV[4] .. old_id .. ':' .. i)
  end
  redis.call('XTRIM', KEYS[2], 'MINID', trim)
end
return 1
";
