//! `DeduperBuilder`: validates a configuration and sizes the tiers.

use std::time::Duration;

use crossbeam_utils::CachePadded;

use crate::error::ConfigError;
use crate::exact::table::{FingerprintTable, Timed, Untimed};
use crate::exact::{ExactTier, Partition, FIRST_TABLE_ENTRIES};
use crate::filter::{BlockedBloom, GenerationalBloom, GrowingBloom, SlotSizing, WindowedFilter};
use crate::fingerprint::Namespace;
use crate::time::{duration_nanos, Clock, ClockSource, Slicing, GENERATIONS};

use crate::durability::{CheckpointPolicy, Durability};

use super::leases::LeaseClock;
use super::shard::{Shard, ShardFilter, ShardRules, Trust};
use super::Deduper;

/// Exact (the default) or filter-only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// No false negative, no false positive: every filter match is confirmed
    /// by the exact tier.
    #[default]
    Exact,
    /// Filter only: about 3.7 bytes per key in the window at the default 1%
    /// rate (3.71 measured in `tests/fpr.rs`; the filter is sized for 7/6 of
    /// a window's keys at about 20 bits per key per generation), no false
    /// negative inside the window, but a never-seen key is reported
    /// [`crate::Verdict::LikelyDuplicate`] at the configured false-positive
    /// rate, and the window is rounded up to whole slices (keys may be
    /// remembered up to one slice longer).
    Probabilistic,
}

/// Whether this engine owns its keys (the filter tier may answer alone) or
/// shares them with other engines on the same exact tier.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Affinity {
    /// Key affinity: every key is routed to one owner (e.g. broker partitions
    /// keyed by the dedup key), so a warm filter's "definitely new" is final
    /// and marks are written asynchronously. After a restart without a
    /// snapshot (or a partition hand-over) the filter is cold: until a whole
    /// window has passed, "definitely new" is confirmed in the exact tier.
    #[default]
    Owned,
    /// No affinity: several engines may see the same key. Every key is
    /// claimed atomically in the exact tier (one batched request per batch),
    /// and the verdict comes after the claim.
    Shared,
}

/// Up front, the memory tiers' tables are sized for the keys of a span
/// (window plus lateness) of at most this many windows: lateness up to one
/// window is sized for (at most twice the tables of none); longer lateness
/// costs table memory only as keys arrive (a table grows by half at 4/5
/// load), not in proportion to (window + lateness) / window.
///
/// The filter (other tiers, shared keys, probabilistic mode) stays sized
/// for the whole span at the expected rate: it cannot grow in place, and
/// its overflow layers, made for bursts, served a steady stream that fills
/// a longer span badly (a steady stream under a lateness of 20 windows,
/// with the filter sized for 8: 4 to 7 times the filter bytes and 3.7 to 5
/// times the false positives of a filter sized for the span).
const TABLE_SIZED_WINDOWS: u64 = 2;

/// How many keys to size for.
#[derive(Clone, Copy, Debug)]
enum Expected {
    PerWindow(u64),
    PerSecond(f64),
}

/// Configures a [`Deduper`]; [`DeduperBuilder::build`] validates it.
#[derive(Clone, Debug)]
#[must_use]
pub struct DeduperBuilder {
    window: Option<Duration>,
    expected: Expected,
    false_positive_rate: f64,
    namespace: (String, Namespace),
    clock: Clock,
    lateness: Option<Duration>,
    mode: Mode,
    shards: Option<usize>,
    exact: ExactTier,
    memory_limit: Option<u64>,
    mark_batch: usize,
    flush_interval: Duration,
    affinity: Affinity,
    first_seen_times: bool,
    prefault: bool,
    lease: Duration,
    max_result_bytes: usize,
    durability: Durability,
    checkpoints: CheckpointPolicy,
}

impl Default for DeduperBuilder {
    fn default() -> Self {
        DeduperBuilder {
            window: Some(Duration::from_secs(3600)),
            expected: Expected::PerWindow(1_000_000),
            false_positive_rate: 0.01,
            namespace: (String::new(), Namespace::default()),
            clock: Clock::System,
            lateness: None,
            mode: Mode::Exact,
            shards: None,
            exact: ExactTier::Memory,
            memory_limit: None,
            mark_batch: 1,
            flush_interval: Duration::from_millis(10),
            affinity: Affinity::Owned,
            first_seen_times: true,
            prefault: false,
            lease: Duration::from_secs(30),
            max_result_bytes: 64 << 10,
            durability: Durability::None,
            checkpoints: CheckpointPolicy::default(),
        }
    }
}

impl DeduperBuilder {
    /// A key is a duplicate when it was accepted less than `window` ago.
    /// Default: one hour.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = Some(window);
        self
    }

    /// Keys never expire: every earlier acceptance counts (like `sort -u`).
    /// The filter then grows with the key count, keeping its rate.
    /// Default: off (a one-hour window).
    pub fn no_window(mut self) -> Self {
        self.window = None;
        self
    }

    /// Distinct keys expected within one window (the filter's sizing; more
    /// keys raise its rate and are counted in [`crate::Stats::over_capacity`],
    /// never forgotten). Without a window: the initial size. Default: 10⁶.
    pub fn expected_keys(mut self, keys: u64) -> Self {
        self.expected = Expected::PerWindow(keys);
        self
    }

    /// Distinct keys expected per second; the count per window follows from
    /// the window. Default: unset (see [`DeduperBuilder::expected_keys`]).
    pub fn expected_rate(mut self, keys_per_second: f64) -> Self {
        self.expected = Expected::PerSecond(keys_per_second);
        self
    }

    /// The filter's false-positive rate per query (over all live
    /// generations). In exact mode it only costs exact-tier lookups; in
    /// probabilistic mode it is the rate of wrong `LikelyDuplicate`s.
    /// Default: 0.01.
    pub fn false_positive_rate(mut self, rate: f64) -> Self {
        self.false_positive_rate = rate;
        self
    }

    /// The key space: the same key in two namespaces is two keys.
    /// Default: `""`.
    pub fn namespace(mut self, name: &str) -> Self {
        self.namespace = (name.to_owned(), Namespace::new(name));
        self
    }

    /// Where "now" comes from. Default: [`Clock::System`] (processing time).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Event time only: how far behind the watermark an event may be and
    /// still be judged exactly (older ones are [`crate::Verdict::Late`]).
    /// Keys are kept for the window plus the lateness. The memory tier's
    /// tables are sized up front for lateness up to one window (at most
    /// twice the tables of none) and grow with the keys actually held, so
    /// a long lateness over a short input costs what the input holds. A
    /// filter (any other tier, shared keys, probabilistic mode) is sized
    /// for the keys of the whole window plus lateness at the expected rate,
    /// what a steady stream holds: about 3.7 bytes per key at the default
    /// rate; lower `expected_keys` for a short input under a long lateness.
    /// Default: zero.
    pub fn allowed_lateness(mut self, lateness: Duration) -> Self {
        self.lateness = Some(lateness);
        self
    }

    /// Exact or filter-only. Default: [`Mode::Exact`].
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Number of shards (rounded up to a power of two). More shards mean
    /// less contention between threads. Default: 4 per available core.
    pub fn shards(mut self, shards: usize) -> Self {
        self.shards = Some(shards);
        self
    }

    /// The exact tier. Default: [`ExactTier::Memory`].
    pub fn exact_tier(mut self, tier: ExactTier) -> Self {
        self.exact = tier;
        self
    }

    /// Marks of accepted keys are queued per shard and written to the exact
    /// tier `size` at a time (read-your-writes: a shard sees its own queued
    /// marks). `1` writes each mark at once. Larger batches cut round trips
    /// to a remote tier. Default: 1.
    pub fn mark_batch(mut self, size: usize) -> Self {
        self.mark_batch = size;
        self
    }

    /// A queued mark is written within this long (by the pipeline's workers,
    /// or by [`Deduper::maintain`]). Default: 10 ms.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// Whether keys are owned by this engine or shared with others on the
    /// same exact tier. Default: [`Affinity::Owned`].
    pub fn affinity(mut self, affinity: Affinity) -> Self {
        self.affinity = affinity;
        self
    }

    /// Whether a duplicate says when its key was first accepted. Default:
    /// true ([`crate::Verdict::Duplicate`] carries the time; 24 bytes per
    /// key in the memory tier). `false` keeps each key's fingerprint alone,
    /// 16 bytes per key, and answers [`crate::Verdict::DuplicateUntimed`]:
    /// for jobs that only need to know *whether* a key was seen (the
    /// `dedup` program without a window). It needs no window (expiry needs
    /// the times), [`Mode::Exact`], [`Affinity::Owned`] and
    /// [`ExactTier::Memory`]; [`DeduperBuilder::build`] refuses anything
    /// else with [`ConfigError::UntimedNeeds`].
    pub fn first_seen_times(mut self, keep: bool) -> Self {
        self.first_seen_times = keep;
        self
    }

    /// Whether [`DeduperBuilder::build`] (and [`DeduperBuilder::open`],
    /// after recovery) faults the memory tier's tables in, instead of the
    /// first checks touching them page by page. Each table is allocated
    /// for its expected keys at the first key; the first touch of each
    /// page costs the kernel's zeroing and, on a virtual machine whose
    /// host has taken the memory back, the host's backing it again —
    /// measured here at 0.084 ms/MB for memory the guest used recently
    /// and 2.1–2.4 ms/MB for memory it had not (up to 0.8 s for 10⁷ keys,
    /// paid by whichever checks come first). With `true` the build pays
    /// it, on one thread per core, and the checks after it run at the same
    /// speed from the first key, like a JVM's `AlwaysPreTouch`. It applies
    /// to the tables of owned keys on [`ExactTier::Memory`] (one per
    /// shard, holding the whole window or, without one, every key); the
    /// resident memory is then the tables' full size from the start
    /// ([`crate::Stats::exact_bytes`]). Tables grown past their expected
    /// keys are touched as they fill. Default: `false`.
    pub fn prefault_tables(mut self, prefault: bool) -> Self {
        self.prefault = prefault;
        self
    }

    /// Whether the engine's tables are faulted in when it is made.
    pub(crate) fn prefaults(&self) -> bool {
        self.prefault
    }

    /// How long a claim's lease lasts unless the claim asks for another
    /// duration ([`crate::ClaimRequest::lease`]) or the holder extends it:
    /// after it, a holder that neither committed nor released (it crashed,
    /// or is stuck) loses the key to the next claim. Pick it longer than
    /// the work a claim guards usually takes. Default: 30 s.
    pub fn lease_duration(mut self, duration: Duration) -> Self {
        self.lease = duration;
        self
    }

    /// The largest result a commit may store ([`crate::Lease::commit`]
    /// refuses more, storing nothing). Default: 64 KiB.
    pub fn max_result_bytes(mut self, bytes: usize) -> Self {
        self.max_result_bytes = bytes;
        self
    }

    /// Refuse to build an engine that would need more than `bytes` for its
    /// expected keys: its filter (allocated at build) plus the memory
    /// tier's tables as sized for the expected keys (allocated as keys
    /// arrive; without a window, the first tables only). Keys beyond the
    /// expected count are still never forgotten: the tables grow past the
    /// limit rather than lose them. Default: no limit but the machine's
    /// memory (or the process's cgroup limit), which is always checked.
    pub fn memory_limit(mut self, bytes: u64) -> Self {
        self.memory_limit = Some(bytes);
        self
    }

    /// How far the state survives a crash: [`Durability::Os`] (a killed
    /// process loses no key whose verdict was returned) or
    /// [`Durability::Sync`] (nor does a power loss), logged in the
    /// directory given to [`DeduperBuilder::open`], which a durable engine
    /// needs (`build` refuses it). Needs the memory tier with owned keys in
    /// exact mode. Default: [`Durability::None`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Whether a durable engine takes checkpoints by itself, on the thread
    /// of a call that finds one due (see
    /// [`DeduperBuilder::checkpoint_log_bytes`] and
    /// [`DeduperBuilder::checkpoint_interval`]); otherwise only when
    /// [`Deduper::checkpoint`] is called. Default: true.
    pub fn automatic_checkpoints(mut self, automatic: bool) -> Self {
        self.checkpoints.automatic = automatic;
        self
    }

    /// A checkpoint is due once the log holds `bytes`, or as many bytes as
    /// the last checkpoint if that is more: so the log stays within about
    /// one checkpoint's size (plus what arrives while one is written), and
    /// a restart replays at most about that much (256 MiB: about 15 M keys
    /// accepted, 2–4 s of replay on the machine of `docs/benchmarks.md`).
    /// Lower it for faster restarts, raise it for fewer checkpoints (each
    /// writes the whole state: 25 bytes per key held). Default: 256 MiB.
    pub fn checkpoint_log_bytes(mut self, bytes: u64) -> Self {
        self.checkpoints.log_bytes = bytes;
        self
    }

    /// A checkpoint is due once this long has passed since the last one (if
    /// anything was logged); `None`: only by size. Default: 10 minutes.
    pub fn checkpoint_interval(mut self, interval: Option<Duration>) -> Self {
        self.checkpoints.interval = interval;
        self
    }

    pub(crate) fn durability_settings(&self) -> (Durability, CheckpointPolicy) {
        (self.durability, self.checkpoints)
    }

    /// The engine.
    ///
    /// # Errors
    /// [`ConfigError`] naming what to change: a zero window, zero expected
    /// keys, a false-positive rate outside (0, 1), zero shards, lateness
    /// without event time, or impossible memory: the filter and the memory
    /// tier's tables as sized for the expected keys above `memory_limit`
    /// ([`ConfigError::MemoryLimit`]) or above the machine's memory
    /// ([`ConfigError::PhysicalMemory`], Linux: `MemTotal`, or the cgroup
    /// limit when lower), or a filter that cannot be allocated
    /// ([`ConfigError::OutOfMemory`]).
    pub fn build(self) -> Result<Deduper, ConfigError> {
        if !self.durability.is_none() {
            return Err(ConfigError::DurabilityNeedsDirectory);
        }
        let engine = self.build_engine()?;
        if self.prefault {
            engine.prefault_tables();
        }
        Ok(engine)
    }

    /// [`DeduperBuilder::build`] whatever the durability (the directory is
    /// attached by [`DeduperBuilder::open`]).
    pub(crate) fn build_engine(&self) -> Result<Deduper, ConfigError> {
        let plan = self.plan()?;
        let source = ClockSource::new(&self.clock);
        let lease_clock = LeaseClock::for_source(&source);
        let shards = (0..plan.shards)
            .map(|i| {
                plan.make_shard(i, &self.exact, lease_clock.clone())
                    .map(|s| CachePadded::new(std::sync::Mutex::new(s)))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Deduper::from_parts(
            plan,
            shards.into_boxed_slice(),
            source,
            lease_clock,
        ))
    }

    /// Validates and sizes, without allocating.
    pub(crate) fn plan(&self) -> Result<Plan, ConfigError> {
        if self.window.is_some_and(|w| w.is_zero()) {
            return Err(ConfigError::ZeroWindow);
        }
        if !(self.false_positive_rate > 0.0 && self.false_positive_rate < 1.0) {
            return Err(ConfigError::FalsePositiveRate(self.false_positive_rate));
        }
        if self.lateness.is_some() && !matches!(self.clock, Clock::EventTime) {
            return Err(ConfigError::LatenessWithoutEventTime);
        }
        let shards = match self.shards {
            Some(0) => return Err(ConfigError::ZeroShards),
            Some(n) => n.next_power_of_two(),
            None => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                (cores * 4).next_power_of_two()
            }
        };
        let window = self.window.map(duration_nanos);
        let lateness = self.lateness.map_or(0, duration_nanos);
        let keys_per_window = match (self.expected, self.window) {
            (Expected::PerWindow(n), _) => n,
            (Expected::PerSecond(r), Some(w)) if r.is_finite() && r > 0.0 => {
                (r * w.as_secs_f64()).ceil().min(u64::MAX as f64) as u64
            }
            (Expected::PerSecond(_), _) => 0,
        };
        if keys_per_window == 0 {
            return Err(ConfigError::ZeroExpectedKeys);
        }
        // Keys per slot (all shards): what a slice receives at the expected
        // rate (the filter's sizing), and what the memory tiers' tables are
        // sized for up front: those of a slice of a span of at most
        // `TABLE_SIZED_WINDOWS` windows.
        let (slicing, keys_per_slice, table_keys_per_slice) = match window {
            Some(w) => {
                let span = w.saturating_add(lateness);
                let slicing = Slicing::for_span(span);
                // Keys arriving in a slice of `nanos` at the expected rate.
                let arriving = |nanos: u64| {
                    (keys_per_window as f64 * nanos as f64 / w as f64)
                        .ceil()
                        .max(1.0)
                };
                let table_span = span.min(w.saturating_mul(TABLE_SIZED_WINDOWS));
                (
                    Some(slicing),
                    arriving(slicing.slice_nanos),
                    arriving(Slicing::for_span(table_span).slice_nanos),
                )
            }
            // No window: every key stays in one slot.
            None => (None, keys_per_window as f64, keys_per_window as f64),
        };
        // Per shard, with three standard deviations of slack for the uneven
        // split of keys over shards.
        let per_shard = |keys: f64| {
            let mean = keys / shards as f64;
            (mean + 3.0 * mean.sqrt() + 1.0).ceil().min(u64::MAX as f64) as u64
        };
        let slot_capacity = per_shard(keys_per_slice);
        let table_slot_keys = per_shard(table_keys_per_slice);
        let sizing = SlotSizing::new(slot_capacity, self.false_positive_rate, 1)?;
        if self.mark_batch == 0 {
            return Err(ConfigError::ZeroMarkBatch);
        }
        if self.lease.is_zero() {
            return Err(ConfigError::ZeroLease);
        }
        if self.affinity == Affinity::Shared && self.mode == Mode::Probabilistic {
            return Err(ConfigError::SharedWithoutExactTier);
        }
        if !self.first_seen_times {
            let unmet = if window.is_some() {
                Some("drop the window (`no_window`)")
            } else if self.mode != Mode::Exact {
                Some("use Mode::Exact")
            } else if self.affinity != Affinity::Owned {
                Some("use Affinity::Owned")
            } else if !matches!(self.exact, ExactTier::Memory) {
                Some("use ExactTier::Memory")
            } else {
                None
            };
            if let Some(fix) = unmet {
                return Err(ConfigError::UntimedNeeds(fix));
            }
        }
        let plan = Plan {
            trust: match self.affinity {
                Affinity::Owned => Trust::Owned,
                Affinity::Shared => Trust::Shared,
            },
            span: window.map_or(u64::MAX, |w| w.saturating_add(lateness)),
            mark_batch: self.mark_batch,
            flush_interval: self.flush_interval,
            window,
            lateness,
            slicing,
            shards,
            sizing,
            rules: ShardRules {
                window,
                slot_capacity,
                warm_up: !matches!(self.clock, Clock::EventTime),
            },
            table_slot_keys,
            keys_per_window,
            false_positive_rate: self.false_positive_rate,
            namespace: self.namespace.1,
            namespace_name: self.namespace.0.clone(),
            mode: self.mode,
            exact_name: self.exact.name(),
            exact: self.exact.clone(),
            untimed: !self.first_seen_times,
            lease_nanos: duration_nanos(self.lease),
            max_result_bytes: self.max_result_bytes,
        };
        plan.check_memory(self.memory_limit)?;
        Ok(plan)
    }
}

/// A validated configuration with its sizes.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) trust: Trust,
    /// Window plus lateness (how long a fresh filter stays cold).
    pub(crate) span: u64,
    pub(crate) mark_batch: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) window: Option<u64>,
    pub(crate) lateness: u64,
    pub(crate) slicing: Option<Slicing>,
    pub(crate) shards: usize,
    pub(crate) sizing: SlotSizing,
    /// Keys per slot per shard the memory tiers' tables are sized for up
    /// front: at most those of a span of `TABLE_SIZED_WINDOWS` windows (the
    /// filter and remote tiers use `rules.slot_capacity`, what a slot
    /// receives at the expected rate).
    pub(crate) table_slot_keys: u64,
    pub(crate) rules: ShardRules,
    pub(crate) keys_per_window: u64,
    pub(crate) false_positive_rate: f64,
    pub(crate) namespace: Namespace,
    pub(crate) namespace_name: String,
    pub(crate) mode: Mode,
    pub(crate) exact_name: &'static str,
    /// The tier itself, kept for its own metrics
    /// ([`ExactTier::report_metrics`]).
    pub(crate) exact: ExactTier,
    /// Built with `first_seen_times(false)`: the memory tier keeps
    /// fingerprints alone.
    pub(crate) untimed: bool,
    /// A claim's lease unless it asks for another.
    pub(crate) lease_nanos: u64,
    /// The cap on a committed result.
    pub(crate) max_result_bytes: usize,
}

/// What a configuration allocates to hold its expected keys, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemoryNeeds {
    /// The filter of every shard, allocated at build.
    pub(crate) filter: u64,
    /// The memory tier's tables of every shard as sized for the expected
    /// keys (allocated as keys arrive; without a window, the first tables
    /// only: keys past them grow the tables). Other tiers: 0.
    pub(crate) exact: u64,
}

impl Plan {
    /// An empty filter of one shard of a windowed engine, as sized.
    ///
    /// # Errors
    /// [`ConfigError::OutOfMemory`] when it cannot be allocated.
    pub(crate) fn windowed_filter(&self) -> Result<Option<WindowedFilter>, ConfigError> {
        let Some(slicing) = self.slicing else {
            return Ok(None);
        };
        let base =
            GenerationalBloom::try_with_parts(slicing, self.sizing.num_blocks, self.sizing.hashes)?;
        Ok(Some(WindowedFilter::new(base, self.rules.slot_capacity)))
    }

    /// Whether an engine of this plan can log its changes: owned keys on
    /// the embedded table (no filter), whose whole state the shards' ops
    /// describe.
    pub(crate) fn can_be_durable(&self) -> bool {
        self.is_direct()
    }

    /// Owned keys on the embedded table: the shard keeps no filter.
    fn is_direct(&self) -> bool {
        self.trust == Trust::Owned
            && self.mode == Mode::Exact
            && matches!(self.exact, ExactTier::Memory)
    }

    /// Entries of a shard's one table (no filter, a window): six slices
    /// of a span and one more that expires while a sweep is running.
    fn one_table_keys(&self) -> u64 {
        self.table_slot_keys.saturating_mul(7)
    }

    /// Keys a shard's growing filter (no window) is first sized for.
    fn growing_initial_keys(&self) -> u64 {
        (self.keys_per_window / self.shards as u64).max(1)
    }

    /// What this configuration allocates to hold its expected keys.
    ///
    /// # Errors
    /// [`ConfigError`] from sizing a growing filter.
    pub(crate) fn memory_needs(&self) -> Result<MemoryNeeds, ConfigError> {
        let shards = self.shards as u64;
        let direct = self.is_direct();
        let filter = match self.slicing {
            _ if direct => 0,
            Some(_) => BlockedBloom::bytes_for(self.sizing.num_blocks),
            None => {
                GrowingBloom::initial_bytes(self.growing_initial_keys(), self.false_positive_rate)?
            }
        };
        let size = |keys: u64| usize::try_from(keys).unwrap_or(usize::MAX);
        let exact = match (self.mode, &self.exact, self.slicing) {
            (Mode::Exact, ExactTier::Memory, Some(_)) if direct => {
                FingerprintTable::<Timed>::bytes_for(size(self.one_table_keys()))
            }
            // A table per live slot (seven), each sized for its slice and
            // a quarter more.
            (Mode::Exact, ExactTier::Memory, Some(_)) => {
                let per_slot = self
                    .table_slot_keys
                    .saturating_add(self.table_slot_keys / 4);
                FingerprintTable::<Timed>::bytes_for(size(per_slot))
                    .saturating_mul(GENERATIONS as u64 - 1)
            }
            // No window: expected keys are the first tables' size; more
            // keys grow them.
            (Mode::Exact, ExactTier::Memory, None) => {
                let first = size(self.rules.slot_capacity).min(FIRST_TABLE_ENTRIES);
                if self.untimed {
                    FingerprintTable::<Untimed>::bytes_for(first)
                } else {
                    FingerprintTable::<Timed>::bytes_for(first)
                }
            }
            _ => 0,
        };
        Ok(MemoryNeeds {
            filter: filter.saturating_mul(shards),
            exact: exact.saturating_mul(shards),
        })
    }

    /// Refuses a configuration whose [`Plan::memory_needs`] exceed `limit`
    /// or the memory this process may use.
    fn check_memory(&self, limit: Option<u64>) -> Result<(), ConfigError> {
        let MemoryNeeds { filter, exact } = self.memory_needs()?;
        let needed = filter.saturating_add(exact);
        if let Some(limit) = limit {
            if needed > limit {
                return Err(ConfigError::MemoryLimit {
                    needed,
                    limit,
                    filter,
                    exact,
                });
            }
        }
        if let Some(physical) = crate::hugealloc::physical_memory() {
            if needed > physical {
                return Err(ConfigError::PhysicalMemory {
                    needed,
                    physical,
                    filter,
                    exact,
                });
            }
        }
        Ok(())
    }

    pub(crate) fn make_shard(
        &self,
        index: usize,
        exact: &ExactTier,
        lease_clock: LeaseClock,
    ) -> Result<Shard, ConfigError> {
        // Owned keys on the embedded table: no filter. Every key costs one
        // probe of the table anyway (its mark or its confirmation); a filter
        // could only add a probe in front. With a window, the table holds
        // the whole window (entries carry their time and are swept out
        // once expired) instead of one table per slice that a filter would
        // have to pick.
        let direct = self.is_direct() && matches!(exact, ExactTier::Memory);
        let one_table_keys = self.one_table_keys();
        let mut partition = match self.mode {
            Mode::Exact => Some({
                let spec = crate::exact::PartitionSpec {
                    shard: index,
                    shards: self.shards,
                    // A windowed slot takes a quarter more than its sizing
                    // before the filter grows overflow layers. A remote tier
                    // lays its keys out for what a slot receives at the
                    // expected rate (it allocates nothing ahead); the memory
                    // tiers' tables are sized for at most a span of
                    // `TABLE_SIZED_WINDOWS` windows and grow.
                    keys_per_slot: usize::try_from(match (self.slicing, exact) {
                        (Some(_), _) if direct => one_table_keys,
                        (Some(_), ExactTier::Custom(_)) => {
                            let at_rate = self.rules.slot_capacity;
                            at_rate.saturating_add(at_rate / 4)
                        }
                        (Some(_), _) => self.table_slot_keys + self.table_slot_keys / 4,
                        (None, _) => self.rules.slot_capacity,
                    })
                    .unwrap_or(usize::MAX),
                    window_nanos: self.window,
                    slice_nanos: self.slicing.map(|s| s.slice_nanos),
                    span_nanos: self.window.map(|w| w.saturating_add(self.lateness)),
                    namespace_seed: self.namespace.seed(),
                    shared: self.trust == Trust::Shared,
                };
                exact.check_spec(&spec)?;
                exact.partition(&spec)
            }),
            Mode::Probabilistic => None,
        };
        let direct = direct && matches!(partition, Some(Partition::Memory(_)));
        if let (true, Some(Partition::Memory(table))) = (self.untimed, &mut partition) {
            table.keep_fingerprints_only();
        }
        if let (true, Some(window), Some(Partition::Memory(table))) =
            (direct, self.window, &mut partition)
        {
            table.use_one_table(
                window,
                self.span,
                usize::try_from(one_table_keys).unwrap_or(usize::MAX),
            );
        }
        // Only a shard that uses a filter allocates one.
        let filter = if direct {
            ShardFilter::Direct
        } else {
            match self.windowed_filter()? {
                Some(f) => ShardFilter::Windowed(f),
                None => ShardFilter::Unbounded(GrowingBloom::new(
                    self.growing_initial_keys(),
                    self.false_positive_rate,
                )?),
            }
        };
        Ok(Shard::new(filter, partition, self.mark_batch, lease_clock))
    }
}
