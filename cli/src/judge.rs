//! Judging a chunk's keys on several threads at once (processing time).
//!
//! The keys are split by fingerprint into one group per thread, each group
//! keeping input order, and each thread makes one batch call for its group.
//! Every copy of a key has the same fingerprint, so all copies go to the same
//! thread in input order: the verdicts are those of one batch call over the
//! whole chunk. The split follows the engine's shard routing (the low bits of
//! the fingerprint), so the threads also lock disjoint shards.
//!
//! Event time is judged in one call: lateness depends on the order of all
//! events, not only of the copies of one key.

use std::num::NonZeroUsize;

use tiered_dedup::{Deduper, Fingerprint, Unsettled, Verdict};

/// Fewer keys than this are judged on the calling thread alone.
const MIN_PARALLEL_KEYS: usize = 8192;

/// Judges batches of keys with up to `threads` threads.
pub struct Judge {
    threads: usize,
    shard_mask: u64,
    groups: Vec<Group>,
}

#[derive(Default)]
struct Group {
    keys: Vec<Fingerprint>,
    positions: Vec<u32>,
    verdicts: Vec<Verdict>,
}

impl Judge {
    /// One thread per core, at most one per shard of `engine`.
    pub fn new(engine: &Deduper) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
        let shards = engine.shard_count();
        Judge {
            threads: cores.min(shards).max(1),
            shard_mask: shards as u64 - 1,
            groups: (0..cores.min(shards).max(1))
                .map(|_| Group::default())
                .collect(),
        }
    }

    /// Verdicts for `keys` into `out`, as `engine.check_batch_into` gives,
    /// without waiting for a durable engine's log: they may be acted on
    /// once the returned [`Unsettled`] (or a later wait that covers it) is
    /// settled.
    pub fn check_deferred(
        &mut self,
        engine: &Deduper,
        keys: &[Fingerprint],
        out: &mut Vec<Verdict>,
    ) -> Unsettled {
        if self.threads == 1 || keys.len() < MIN_PARALLEL_KEYS {
            return engine.check_batch_into_deferred(keys, out);
        }
        let n = self.threads as u64;
        for g in &mut self.groups {
            g.keys.clear();
            g.positions.clear();
        }
        for (i, &fp) in keys.iter().enumerate() {
            let g = &mut self.groups[((fp.low() & self.shard_mask) % n) as usize];
            g.keys.push(fp);
            g.positions.push(i as u32);
        }
        let unsettled = std::thread::scope(|scope| {
            let (first, rest) = self.groups.split_at_mut(1);
            let handles: Vec<_> = rest
                .iter_mut()
                .map(|g| {
                    scope.spawn(move || engine.check_batch_into_deferred(&g.keys, &mut g.verdicts))
                })
                .collect();
            let g = &mut first[0];
            let mut unsettled = engine.check_batch_into_deferred(&g.keys, &mut g.verdicts);
            for h in handles {
                match h.join() {
                    Ok(u) => unsettled = unsettled.max(u),
                    Err(panic) => std::panic::resume_unwind(panic),
                }
            }
            unsettled
        });
        out.clear();
        out.resize(keys.len(), Verdict::New);
        for g in &self.groups {
            for (&at, &v) in g.positions.iter().zip(&g.verdicts) {
                out[at as usize] = v;
            }
        }
        unsettled
    }
}
