//! Counters: plain integers per shard (the shard's owner is the only
//! writer), summed into a [`Stats`] snapshot on read.

/// Upper bounds (µs) of the exact-tier latency buckets; one more bucket
/// holds the rest.
pub(crate) const LATENCY_BUCKETS_MICROS: [u64; 16] = [
    50, 100, 200, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000,
    1_000_000, 2_000_000, 5_000_000,
];

/// What one shard has decided. Private to the shard; read through [`Stats`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ShardCounters {
    pub(crate) checks: u64,
    pub(crate) new: u64,
    pub(crate) duplicates: u64,
    pub(crate) likely_duplicates: u64,
    pub(crate) unavailable: u64,
    pub(crate) maybe_seen: u64,
    pub(crate) false_positives: u64,
    pub(crate) reaccepted_after_window: u64,
    pub(crate) rotations: u64,
    pub(crate) over_capacity: u64,
    pub(crate) overflow_inserts: u64,
    pub(crate) mark_errors: u64,
    pub(crate) marks_queued: u64,
    pub(crate) marks_flushed: u64,
    pub(crate) mark_flushes: u64,
    pub(crate) batches: u64,
    pub(crate) batch_keys: u64,
    pub(crate) exact_calls: u64,
    pub(crate) exact_call_nanos: u64,
    pub(crate) exact_latency_buckets: [u64; LATENCY_BUCKETS_MICROS.len() + 1],
    /// Checks of keys held by a live lease.
    pub(crate) in_progress: u64,
    pub(crate) claims: u64,
    pub(crate) acquired: u64,
    pub(crate) claims_in_progress: u64,
    pub(crate) claims_completed: u64,
    pub(crate) conflicts: u64,
    pub(crate) commits: u64,
    pub(crate) releases: u64,
    pub(crate) leases_expired: u64,
    pub(crate) lease_lost: u64,
    pub(crate) result_bytes: u64,
    pub(crate) forgotten: u64,
}

impl ShardCounters {
    /// Records one batched exact-tier call that took `nanos`.
    pub(crate) fn exact_call(&mut self, nanos: u64) {
        self.exact_calls += 1;
        self.exact_call_nanos += nanos;
        let micros = nanos / 1_000;
        let bucket = LATENCY_BUCKETS_MICROS
            .iter()
            .position(|&b| micros <= b)
            .unwrap_or(LATENCY_BUCKETS_MICROS.len());
        self.exact_latency_buckets[bucket] += 1;
    }
}

/// A snapshot of an engine's counters and sizes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Keys checked (late events excluded).
    pub checks: u64,
    /// Verdicts `New`.
    pub new: u64,
    /// Verdicts `Duplicate`.
    pub duplicates: u64,
    /// Verdicts `LikelyDuplicate` (probabilistic mode).
    pub likely_duplicates: u64,
    /// Verdicts `Late` (event time).
    pub late: u64,
    /// Verdicts `Unavailable`.
    pub unavailable: u64,
    /// Keys the filter matched (sent to the exact tier in exact mode).
    pub filter_maybe_seen: u64,
    /// Filter matches the exact tier found absent: false positives caught.
    pub false_positives_caught: u64,
    /// Keys found in the exact tier but older than the window, accepted again
    /// (on the memory tier's one table, only those the sweep had not yet
    /// removed; the others are plain new keys).
    pub reaccepted_after_window: u64,
    /// Shard rotations (a shard moving to a new slice and clearing its spare;
    /// on the memory tier without a filter, entering a new slice, when a
    /// sweep of expired entries may start).
    pub rotations: u64,
    /// Keys inserted into a generation whose every layer was full (past 12
    /// overflow layers, or a layer the memory could not be had for; a
    /// growing filter that could not add a layer): the rate is above
    /// target while this grows (never a false negative).
    pub over_capacity: u64,
    /// Keys a burst sent to overflow layers because their slice already held
    /// its sized capacity; the layers are freed when their slices expire.
    /// Often nonzero: raise expected keys to avoid the extra cache line.
    pub overflow_inserts: u64,
    /// Overflow layers alive now.
    pub overflow_layers: u64,
    /// Marks in flushes that failed (a remote tier keeps them for retry; a
    /// Redis flush that fails while an earlier one's replies are read
    /// counts its own marks).
    pub mark_errors: u64,
    /// Marks of accepted keys queued for the exact tier.
    pub marks_queued: u64,
    /// Marks handed to the exact tier (Redis acknowledges them later:
    /// `RedisStats::marks_written` counts what it has stored).
    pub marks_flushed: u64,
    /// Mark batches written (`marks_flushed / mark_flushes` is the mean
    /// batch size).
    pub mark_flushes: u64,
    /// Marks queued but not yet written.
    pub marks_pending: u64,
    /// Shard groups checked in batches (one lock per shard per batch).
    pub batches: u64,
    /// Keys checked in those batches (`batch_keys / batches` is the mean
    /// per-shard batch size).
    pub batch_keys: u64,
    /// Batched exact-tier calls (lookups, claims, mark writes).
    pub exact_calls: u64,
    /// Their total time in nanoseconds.
    pub exact_call_nanos: u64,
    /// Their latency histogram: counts per bucket, bounds in
    /// `docs/metrics.md` (50 µs … 5 s, then the rest).
    pub exact_latency_buckets: [u64; 17],
    /// Bytes of filter memory (0 on the memory tier with owned keys, which
    /// keeps no filter).
    pub filter_bytes: u64,
    /// Entries in the exact tier (local backends; for Redis, the marks this
    /// process holds that Redis has not acknowledged).
    pub exact_entries: u64,
    /// Bytes of exact-tier memory in this process.
    pub exact_bytes: u64,
    /// Estimated false-positive rate of a filter query now (mean over shards).
    pub estimated_fpr: f64,
    /// Fill of each live filter generation — the fraction of its bits set,
    /// sampled, mean over shards — newest first: `[0]` is the current
    /// slice's, `[6]` the oldest still inside the window. Zero without a
    /// window or without a filter.
    pub generation_fill: [f64; crate::time::GENERATIONS - 1],
    /// Checks of keys held by a live claim's lease (verdict `InProgress`).
    pub in_progress: u64,
    /// Claims and their leases.
    pub claims: ClaimStats,
}

/// What claims did (see [`crate::Claim`]), summed over shards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ClaimStats {
    /// Claims made (late ones excluded).
    pub claims: u64,
    /// Claims answered `Acquired`.
    pub acquired: u64,
    /// Claims answered `InProgress` (another live lease held the key).
    pub in_progress: u64,
    /// Claims answered `Completed` (a record within the window).
    pub completed: u64,
    /// Claims answered `Conflict` (a different payload fingerprint).
    pub conflicts: u64,
    /// Leases committed.
    pub commits: u64,
    /// Leases released (explicitly or by being dropped).
    pub releases: u64,
    /// Leases found expired (by a later claim or check, or at a rotation).
    pub leases_expired: u64,
    /// Commits, releases and extensions refused because the lease was lost
    /// (it expired and the key was claimed again, or was forgotten).
    pub lease_lost: u64,
    /// Result bytes committed.
    pub result_bytes: u64,
    /// Keys forgotten (`Deduper::forget`) that held a lease or a record.
    pub forgotten: u64,
    /// Leases live now (held keys, owned or local).
    pub leases_live: u64,
}

impl Stats {
    pub(crate) fn add(&mut self, c: &ShardCounters) {
        self.checks += c.checks;
        self.new += c.new;
        self.duplicates += c.duplicates;
        self.likely_duplicates += c.likely_duplicates;
        self.unavailable += c.unavailable;
        self.filter_maybe_seen += c.maybe_seen;
        self.false_positives_caught += c.false_positives;
        self.reaccepted_after_window += c.reaccepted_after_window;
        self.rotations += c.rotations;
        self.over_capacity += c.over_capacity;
        self.overflow_inserts += c.overflow_inserts;
        self.mark_errors += c.mark_errors;
        self.marks_queued += c.marks_queued;
        self.marks_flushed += c.marks_flushed;
        self.mark_flushes += c.mark_flushes;
        self.batches += c.batches;
        self.batch_keys += c.batch_keys;
        self.exact_calls += c.exact_calls;
        self.exact_call_nanos += c.exact_call_nanos;
        self.in_progress += c.in_progress;
        let claims = &mut self.claims;
        claims.claims += c.claims;
        claims.acquired += c.acquired;
        claims.in_progress += c.claims_in_progress;
        claims.completed += c.claims_completed;
        claims.conflicts += c.conflicts;
        claims.commits += c.commits;
        claims.releases += c.releases;
        claims.leases_expired += c.leases_expired;
        claims.lease_lost += c.lease_lost;
        claims.result_bytes += c.result_bytes;
        claims.forgotten += c.forgotten;
        for (sum, n) in self
            .exact_latency_buckets
            .iter_mut()
            .zip(c.exact_latency_buckets)
        {
            *sum += n;
        }
    }
}
