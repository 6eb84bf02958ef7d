//! Filter tier: `GenerationalBloom` against `fastbloom` 0.17 and `bloomfilter`
//! 3 at equal bits per key per generation (`shape_for(0.01)`: about 12 bits
//! per key, k = 5 for ours; each peer gets the same number of bits).
//!
//! Groups (the workload is in the group name):
//!
//! - `filter_query_present_n…`: queries of keys that were inserted;
//! - `filter_query_absent_n…`: queries of keys that were never inserted;
//! - `filter_insert_n…`: inserts of fresh keys into a filter that fills from
//!   empty to its sized capacity and is then cleared (untimed) and refilled
//!   (ours one key at a time, `insert`, and a chunk at a time, `insert_batch`).
//!
//! One criterion iteration is a chunk of 4096 keys (`Throughput::Elements`).
//! Keys are xxh3-128 fingerprints of seeded SplitMix64 outputs; fastbloom is
//! fed the fingerprint's low 64 bits as its precomputed hash
//! (`contains_hash`/`insert_hash`), bloomfilter hashes the 128-bit
//! fingerprint itself (SipHash-1-3, as it always does).
//!
//! `n = 10⁵` (the peers' 150 kB fit in a 1 MiB L2, our 1.2 MB of eight
//! generations just in L3) and `n = 10⁶` keys (the peers' 1.5 MB and our
//! 12 MB fit only in the 32 MiB L3) run by default;
//! `n = 10⁸` keys in one generation (ours: 8 generations × 150 MB = 1.2 GB)
//! runs only with `TD_BENCH_LARGE=1`. Each group's filters are built once,
//! outside the timed loop; the false-positive rate of each filter on 10⁶
//! absent keys and its bits per key are printed to stderr while building.
//!
//! `TD_BENCH_PAIRED=N` adds, for each size, N rounds of whole passes
//! alternating ours and the peers (queries over the whole key set, inserts
//! of up to 2²² fresh keys into cleared filters) and prints each round's
//! ratio and the median: ratios of adjacent passes survive the drift of
//! this shared machine, which criterion's separate groups do not.
//!
//! ```text
//! CARGO_TARGET_DIR=/work/target-bench cargo bench --bench filter
//! TD_BENCH_LARGE=1 CARGO_TARGET_DIR=/work/target-bench cargo bench --bench filter
//! ```

mod support;
use support::rng::{mix, Rng};
use support::{env_number, median, paired_rounds, t0, Order, WINDOW};

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion, Throughput};
use tiered_dedup::filter::sizing::{shape_for, standard_bloom_fpr, FilterShape};
use tiered_dedup::{Fingerprint, GenerationalBloom, Key, Namespace, Timestamp};

/// Keys per criterion iteration.
const CHUNK: usize = 4096;
/// Absent keys used to measure false-positive rates.
const FPR_PROBES: u64 = 1_000_000;
/// Key-space offsets: present keys are `0..n`, the others start here.
const ABSENT_BASE: u64 = 1 << 40;
const FPR_BASE: u64 = 1 << 41;
const INSERT_BASE: u64 = 1 << 42;
const SEED: u64 = 0x5EED_F11E_7E12_0001;

/// The fingerprint of key number `i` (distinct `i`, distinct keys).
fn fp(i: u64) -> Fingerprint {
    mix(SEED ^ i).fingerprint(Namespace::default())
}

/// The hash fastbloom is given: the fingerprint's low half.
#[inline]
fn fb_hash(fp: Fingerprint) -> u64 {
    fp.low()
}

fn configure(g: &mut BenchmarkGroup<'_, WallTime>) {
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(CHUNK as u64));
}

fn shape() -> FilterShape {
    shape_for(0.01).expect("a 1% shape exists")
}

fn ours_empty(n: u64) -> GenerationalBloom {
    GenerationalBloom::with_shape(WINDOW, n, shape()).expect("valid shape")
}

/// Bits of one generation of ours (= bits every peer gets): one 64-bit word
/// per block per generation, so numerically equal to the total bytes.
fn bits_per_generation(ours: &GenerationalBloom) -> usize {
    ours.bytes()
}

fn fastbloom_empty(bits: usize, n: u64) -> fastbloom::BloomFilter {
    fastbloom::BloomFilter::with_num_bits(bits).expected_items(n as usize)
}

fn bloomfilter_empty(bits: usize, n: u64) -> bloomfilter::Bloom<u128> {
    // Its two SipHash keys are the seed's halves: they must differ, or its
    // double hashing degenerates (a constant seed such as [7; 32] measured a
    // 3.8% rate instead of 0.3%).
    let mut rng = Rng::new(SEED ^ 0xB100_F11E);
    let mut seed = [0u8; 32];
    for word in seed.chunks_exact_mut(8) {
        word.copy_from_slice(&rng.next().to_le_bytes());
    }
    bloomfilter::Bloom::new_with_seed(bits / 8, n as usize, &seed).expect("valid size")
}

/// The filters of the query groups, holding keys `0..n`.
struct Filters {
    n: u64,
    ours: GenerationalBloom,
    fastbloom: fastbloom::BloomFilter,
    fastbloom_k5: fastbloom::BloomFilter,
    bloomfilter: bloomfilter::Bloom<u128>,
}

fn build(n: u64) -> Filters {
    let started = Instant::now();
    let ours = ours_empty(n);
    let bits = bits_per_generation(&ours);
    assert_eq!(bits, bits_for(n));
    let t = t0();
    let (fastbloom, fastbloom_k5, bloomfilter) = std::thread::scope(|s| {
        let ours = &ours;
        s.spawn(move || (0..n).for_each(|i| ours.insert(fp(i), t)));
        let fb = s.spawn(move || {
            let mut fb = fastbloom_empty(bits, n);
            let mut fb5 = fastbloom::BloomFilter::with_num_bits(bits).hashes(shape().hashes);
            for i in 0..n {
                let h = fb_hash(fp(i));
                fb.insert_hash(h);
                fb5.insert_hash(h);
            }
            (fb, fb5)
        });
        let mut bf = bloomfilter_empty(bits, n);
        (0..n).for_each(|i| bf.set(&fp(i).0));
        let (fb, fb5) = fb.join().expect("fastbloom build");
        (fb, fb5, bf)
    });
    eprintln!(
        "[filter n={n}] built the query filters in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let filters = Filters {
        n,
        ours,
        fastbloom,
        fastbloom_k5,
        bloomfilter,
    };
    report_fpr_and_size(&filters);
    filters
}

/// Prints each filter's false-positive rate on 10⁶ never-inserted keys and
/// its bits and bytes per key per generation.
fn report_fpr_and_size(f: &Filters) {
    let n = f.n;
    let t = t0();
    let rate = |hit: &dyn Fn(Fingerprint) -> bool| {
        let hits = (FPR_BASE..FPR_BASE + FPR_PROBES)
            .filter(|&i| hit(fp(i)))
            .count();
        hits as f64 / FPR_PROBES as f64
    };
    let ours = rate(&|k| f.ours.contains(k, t));
    let fb = rate(&|k| f.fastbloom.contains_hash(fb_hash(k)));
    let fb5 = rate(&|k| f.fastbloom_k5.contains_hash(fb_hash(k)));
    let bf = rate(&|k| f.bloomfilter.check(&k.0));
    let s = shape();
    let bits = bits_per_generation(&f.ours) as f64;
    let per_key = bits / n as f64;
    eprintln!(
        "[filter n={n}] bits/key/generation: ours {per_key:.2} (k={}, 8 generations: {:.2} bytes/key in all, {} bytes), \
         fastbloom {:.2} (k={}), fastbloom_k5 {:.2} (k=5), bloomfilter {:.2} (k={})",
        s.hashes,
        f.ours.bytes() as f64 / n as f64,
        f.ours.bytes(),
        f.fastbloom.num_bits() as f64 / n as f64,
        f.fastbloom.num_hashes(),
        f.fastbloom_k5.num_bits() as f64 / n as f64,
        f.bloomfilter.len() as f64 / n as f64,
        f.bloomfilter.number_of_hash_functions(),
    );
    eprintln!(
        "[filter n={n}] false-positive rate on {FPR_PROBES} absent keys: ours {:.4}% (layout model {:.4}%), \
         fastbloom {:.4}% (standard model {:.4}%), fastbloom_k5 {:.4}% (model {:.4}%), bloomfilter {:.4}%",
        ours * 100.0,
        s.fpr() * 100.0,
        fb * 100.0,
        standard_bloom_fpr(per_key, f.fastbloom.num_hashes()) * 100.0,
        fb5 * 100.0,
        standard_bloom_fpr(per_key, 5) * 100.0,
        bf * 100.0,
    );
}

/// Walks a key set chunk by chunk, wrapping around.
struct Cursor<'a> {
    keys: &'a [Fingerprint],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(keys: &'a [Fingerprint]) -> Self {
        assert!(keys.len() % CHUNK == 0 && !keys.is_empty());
        Cursor { keys, at: 0 }
    }

    fn next_chunk(&mut self) -> &'a [Fingerprint] {
        let chunk = &self.keys[self.at..self.at + CHUNK];
        self.at = (self.at + CHUNK) % self.keys.len();
        chunk
    }
}

/// Query key sets: large enough that at 10⁸ keys the blocks they touch do
/// not fit in cache (2²² keys → 256 MiB of distinct lines), small at 10⁵
/// keys (2¹⁴ keys, 256 KiB) so the key array does not evict the filters.
fn query_set_len(n: u64) -> usize {
    if n > 10_000_000 {
        1 << 22
    } else if n > 100_000 {
        1 << 18
    } else {
        1 << 14
    }
}

fn present_keys(n: u64) -> Vec<Fingerprint> {
    let mut rng = Rng::new(SEED ^ 0xA11CE);
    (0..query_set_len(n)).map(|_| fp(rng.next() % n)).collect()
}

fn absent_keys(n: u64) -> Vec<Fingerprint> {
    (0..query_set_len(n) as u64)
        .map(|i| fp(ABSENT_BASE + i))
        .collect()
}

fn bench_queries(c: &mut Criterion, label: &str, f: &Filters, keys: &[Fingerprint], present: bool) {
    let t = t0();
    let kind = if present { "present" } else { "absent" };
    let mut g = c.benchmark_group(format!("filter_query_{kind}_{label}_bpk12_k5"));
    configure(&mut g);

    let mut cur = Cursor::new(keys);
    g.bench_function("ours/contains", |b| {
        b.iter(|| {
            let mut hits = 0u32;
            for &k in cur.next_chunk() {
                hits += u32::from(f.ours.contains(k, t));
            }
            hits
        });
    });
    let mut cur = Cursor::new(keys);
    let mut out = Vec::with_capacity(CHUNK);
    g.bench_function("ours/contains_batch", |b| {
        b.iter(|| {
            f.ours.contains_batch(cur.next_chunk(), t, &mut out);
            out.iter().filter(|&&h| h).count()
        });
    });
    if present {
        // Every key is present: check_and_insert answers MaybeSeen and
        // inserts nothing, so the filter does not change.
        let mut cur = Cursor::new(keys);
        g.bench_function("ours/check_and_insert", |b| {
            b.iter(|| {
                let mut seen = 0u32;
                for &k in cur.next_chunk() {
                    seen += u32::from(!f.ours.check_and_insert(k, t).is_definitely_new());
                }
                seen
            });
        });
    }
    let mut cur = Cursor::new(keys);
    g.bench_function("fastbloom/contains_hash", |b| {
        b.iter(|| {
            let mut hits = 0u32;
            for &k in cur.next_chunk() {
                hits += u32::from(f.fastbloom.contains_hash(fb_hash(k)));
            }
            hits
        });
    });
    let mut cur = Cursor::new(keys);
    g.bench_function("fastbloom_k5/contains_hash", |b| {
        b.iter(|| {
            let mut hits = 0u32;
            for &k in cur.next_chunk() {
                hits += u32::from(f.fastbloom_k5.contains_hash(fb_hash(k)));
            }
            hits
        });
    });
    let mut cur = Cursor::new(keys);
    g.bench_function("bloomfilter/check", |b| {
        b.iter(|| {
            let mut hits = 0u32;
            for &k in cur.next_chunk() {
                hits += u32::from(f.bloomfilter.check(&k.0));
            }
            hits
        });
    });
    g.finish();
}

/// Fresh keys for the insert groups, a chunk at a time. A filter takes at
/// most `n` of them; then it is cleared (untimed) and filled again, so the
/// timed inserts see every fill level from empty to capacity.
struct InsertStream {
    n: u64,
    next_key: u64,
    in_filter: u64,
    chunk: Vec<Fingerprint>,
}

impl InsertStream {
    fn new(n: u64) -> Self {
        InsertStream {
            n,
            next_key: INSERT_BASE,
            in_filter: 0,
            chunk: Vec::with_capacity(CHUNK),
        }
    }

    /// Loads the next chunk of fresh keys; true when the filter must be
    /// cleared first.
    fn advance(&mut self) -> bool {
        self.chunk.clear();
        self.chunk
            .extend((self.next_key..self.next_key + CHUNK as u64).map(fp));
        self.next_key += CHUNK as u64;
        let wrap = self.in_filter + CHUNK as u64 > self.n;
        if wrap {
            self.in_filter = 0;
        }
        self.in_filter += CHUNK as u64;
        wrap
    }
}

/// Times `insert` over fresh chunks of keys; `clear` runs untimed whenever
/// the filter is full.
fn time_inserts<F>(
    iters: u64,
    stream: &mut InsertStream,
    filter: &mut F,
    clear: impl Fn(&mut F),
    insert: impl Fn(&mut F, &[Fingerprint]) -> u32,
) -> Duration {
    let mut total = Duration::ZERO;
    let mut sink = 0u32;
    for _ in 0..iters {
        if stream.advance() {
            clear(filter);
        }
        let start = Instant::now();
        sink = sink.wrapping_add(insert(filter, &stream.chunk));
        total += start.elapsed();
    }
    black_box(sink);
    total
}

/// Bits per generation of ours for `n` keys (what `with_shape` allocates).
fn bits_for(n: u64) -> usize {
    let blocks = (n as f64 * shape().bits_per_key / 64.0).ceil() as usize;
    blocks.max(1) * 64
}

/// Our filter and the time it is written at. Clearing moves time eight
/// slices on, which clears every slot; the first clear also faults in the
/// lazily zeroed pages before anything is timed.
struct OursAt {
    f: GenerationalBloom,
    now: Timestamp,
}

impl OursAt {
    fn new(n: u64) -> Self {
        let f = ours_empty(n);
        let now = t0();
        f.advance(now);
        let mut this = OursAt { f, now };
        this.clear();
        this
    }

    fn clear(&mut self) {
        self.now = self.now.saturating_add(self.f.slice_duration() * 8);
        self.f.advance(self.now);
    }
}

fn bench_inserts(c: &mut Criterion, label: &str, n: u64) {
    let mut g = c.benchmark_group(format!("filter_insert_{label}_bpk12_k5"));
    configure(&mut g);
    let bits = bits_for(n);

    g.bench_function("ours/insert", |b| {
        let mut ours = OursAt::new(n);
        let mut stream = InsertStream::new(n);
        b.iter_custom(|iters| {
            time_inserts(iters, &mut stream, &mut ours, OursAt::clear, |o, chunk| {
                for &k in chunk {
                    o.f.insert(k, o.now);
                }
                0
            })
        });
    });
    g.bench_function("ours/insert_batch", |b| {
        let mut ours = OursAt::new(n);
        let mut stream = InsertStream::new(n);
        b.iter_custom(|iters| {
            time_inserts(iters, &mut stream, &mut ours, OursAt::clear, |o, chunk| {
                o.f.insert_batch(chunk, o.now);
                0
            })
        });
    });
    g.bench_function("ours/check_and_insert", |b| {
        let mut ours = OursAt::new(n);
        let mut stream = InsertStream::new(n);
        b.iter_custom(|iters| {
            time_inserts(iters, &mut stream, &mut ours, OursAt::clear, |o, chunk| {
                chunk
                    .iter()
                    .map(|&k| u32::from(o.f.check_and_insert(k, o.now).is_definitely_new()))
                    .sum()
            })
        });
    });
    g.bench_function("fastbloom/insert_hash", |b| {
        let mut f = fastbloom_empty(bits, n);
        let mut stream = InsertStream::new(n);
        b.iter_custom(|iters| {
            time_inserts(
                iters,
                &mut stream,
                &mut f,
                fastbloom::BloomFilter::clear,
                |f, chunk| {
                    chunk
                        .iter()
                        .map(|&k| u32::from(f.insert_hash(fb_hash(k))))
                        .sum()
                },
            )
        });
    });
    g.bench_function("fastbloom_atomic/insert_hash", |b| {
        let mut f = fastbloom::AtomicBloomFilter::with_num_bits(bits).expected_items(n as usize);
        let mut stream = InsertStream::new(n);
        b.iter_custom(|iters| {
            time_inserts(
                iters,
                &mut stream,
                &mut f,
                |f| f.clear(),
                |f, chunk| {
                    chunk
                        .iter()
                        .map(|&k| u32::from(f.insert_hash(fb_hash(k))))
                        .sum()
                },
            )
        });
    });
    g.bench_function("bloomfilter/set", |b| {
        let mut f = bloomfilter_empty(bits, n);
        // Fault in the calloc'ed bitmap before timing.
        f.clear();
        let mut stream = InsertStream::new(n);
        b.iter_custom(|iters| {
            time_inserts(
                iters,
                &mut stream,
                &mut f,
                bloomfilter::Bloom::clear,
                |f, chunk| {
                    for &k in chunk {
                        f.set(&k.0);
                    }
                    0
                },
            )
        });
    });
    g.finish();
}

/// `TD_BENCH_PAIRED=N`: the number of paired rounds (0 when unset).
fn paired_round_count() -> usize {
    env_number("TD_BENCH_PAIRED").unwrap_or(0)
}

/// Nanoseconds per key of one timed pass.
fn ns_per_key(keys: usize, pass: impl FnOnce() -> u64) -> f64 {
    let start = Instant::now();
    black_box(pass());
    start.elapsed().as_nanos() as f64 / keys as f64
}

/// Runs `rounds` paired rounds of three passes (ours, fastbloom,
/// bloomfilter; ns per key each), alternating who goes first, and prints,
/// for each peer, the ratio peer time / our time of every round and their
/// median (above 1: ours is faster).
fn pair_and_report(what: &str, rounds: usize, mut passes: [&mut dyn FnMut() -> f64; 3]) {
    let [ours, fast, bloom]: [Vec<f64>; 3] =
        paired_rounds(rounds, Order::Alternate, &mut passes, |_, _| {})
            .try_into()
            .expect("three passes");
    for (name, times) in [("fastbloom", fast), ("bloomfilter", bloom)] {
        let ratios: Vec<f64> = times.iter().zip(&ours).map(|(p, o)| p / o).collect();
        let shown: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
        eprintln!(
            "[filter paired] {what}: ours {:.2} ns/key, {name} {:.2} ns/key; ratio per round [{}], median {:.2}x",
            median(ours.iter().copied()),
            median(times.iter().copied()),
            shown.join(", "),
            median(ratios)
        );
    }
}

/// Paired query passes: every round times one whole pass over `keys` for
/// ours (`contains_batch`) and each peer, alternating who goes first. A pass
/// walks the key set as often as it takes to make 2²² queries, so even the
/// small sets' passes last milliseconds.
fn paired_queries(label: &str, f: &Filters, set: &[Fingerprint], present: bool, rounds: usize) {
    let t = t0();
    // Repeating the small set (rather than a longer array) keeps the keys
    // from evicting the filters.
    let reps = ((1usize << 22) / set.len()).max(1);
    let keys = || (0..reps).flat_map(|_| set.chunks(CHUNK));
    let queries = set.len() * reps;
    let mut out = Vec::with_capacity(CHUNK);
    let mut pass_ours = || {
        ns_per_key(queries, || {
            let mut hits = 0u64;
            for chunk in keys() {
                f.ours.contains_batch(chunk, t, &mut out);
                hits += out.iter().filter(|&&h| h).count() as u64;
            }
            hits
        })
    };
    let mut pass_fast = || {
        ns_per_key(queries, || {
            let mut hits = 0u64;
            for _ in 0..reps {
                for &k in set {
                    hits += u64::from(f.fastbloom.contains_hash(fb_hash(k)));
                }
            }
            hits
        })
    };
    let mut pass_bloom = || {
        ns_per_key(queries, || {
            let mut hits = 0u64;
            for _ in 0..reps {
                for k in set {
                    hits += u64::from(f.bloomfilter.check(&k.0));
                }
            }
            hits
        })
    };
    let kind = if present { "present" } else { "absent" };
    pair_and_report(
        &format!("query {kind} {label}"),
        rounds,
        [&mut pass_ours, &mut pass_fast, &mut pass_bloom],
    );
}

/// Paired insert passes: every round inserts the same fresh keys (up to
/// 2²² of them, so a pass fits the filter's sizing) into a just-cleared
/// filter of each kind, alternating who goes first; clearing is untimed.
fn paired_inserts(label: &str, n: u64, rounds: usize) {
    let keys: Vec<Fingerprint> = (0..n.min(1 << 22)).map(|i| fp(INSERT_BASE + i)).collect();
    let bits = bits_for(n);
    let mut o = OursAt::new(n);
    let mut fb = fastbloom_empty(bits, n);
    let mut bf = bloomfilter_empty(bits, n);
    let mut pass_ours = || {
        o.clear();
        ns_per_key(keys.len(), || {
            for chunk in keys.chunks(CHUNK) {
                o.f.insert_batch(chunk, o.now);
            }
            0
        })
    };
    let mut pass_fast = || {
        fb.clear();
        ns_per_key(keys.len(), || {
            for &k in &keys {
                fb.insert_hash(fb_hash(k));
            }
            0
        })
    };
    let mut pass_bloom = || {
        bf.clear();
        ns_per_key(keys.len(), || {
            for k in &keys {
                bf.set(&k.0);
            }
            0
        })
    };
    pair_and_report(
        &format!("insert_batch {label}"),
        rounds,
        [&mut pass_ours, &mut pass_fast, &mut pass_bloom],
    );
}

fn run_size(c: &mut Criterion, n: u64, label: &str) {
    let rounds = paired_round_count();
    {
        let filters = build(n);
        let present = present_keys(n);
        if rounds > 0 {
            paired_queries(label, &filters, &present, true, rounds);
        }
        bench_queries(c, label, &filters, &present, true);
        drop(present);
        let absent = absent_keys(n);
        if rounds > 0 {
            paired_queries(label, &filters, &absent, false, rounds);
        }
        bench_queries(c, label, &filters, &absent, false);
    }
    if rounds > 0 {
        paired_inserts(label, n, rounds);
    }
    bench_inserts(c, label, n);
}

fn small(c: &mut Criterion) {
    // 10⁵: the peers are 150 kB, ours (8 generations) 1.2 MB.
    run_size(c, 100_000, "n1e5");
    // 10⁶: the peers are 1.5 MB, ours 12 MB.
    run_size(c, 1_000_000, "n1e6");
}

fn large(c: &mut Criterion) {
    if support::large() {
        run_size(c, 100_000_000, "n1e8");
    } else {
        eprintln!("[filter] skipping the n=1e8 groups (about 3 GB, minutes to build): set TD_BENCH_LARGE=1 to run them");
    }
}

criterion_group!(benches, small, large);
criterion_main!(benches);
