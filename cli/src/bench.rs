//! `dedup bench`: the engine's throughput on a generated stream of keys —
//! so many checks, so many of them repeats of an earlier key (any earlier
//! key, or a recent one at a Zipf-distributed distance) — for each exact
//! tier and thread count asked for. Also writes the stream as lines
//! (`--emit-lines`), the input of the speed comparison in `docs/cli.md`.

use std::io::{self, Write};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use tiered_dedup::exact::ExactTier;
use tiered_dedup::{Deduper, Mode, Verdict};

use crate::cli::{BenchArgs, BenchTier, Distribution};

/// SplitMix64: a seeded, dependency-free random stream.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Zipf-distributed integers in `1..=n` with exponent `s`, by
/// rejection-inversion (Hörmann and Derflinger, 1996): O(1) per sample for
/// any `n`, which grows here with every fresh key.
fn zipf(rng: &mut Rng, n: u64, s: f64) -> u64 {
    let n = n as f64;
    let t = if s == 1.0 {
        1.0 + n.ln()
    } else {
        (n.powf(1.0 - s) - s) / (1.0 - s)
    };
    loop {
        let pt = rng.unit() * t;
        let inv_b = if pt <= 1.0 {
            pt
        } else if s == 1.0 {
            (pt - 1.0).exp()
        } else {
            (pt * (1.0 - s) + s).powf(1.0 / (1.0 - s))
        };
        let x = (inv_b + 1.0).floor();
        let mut ratio = x.powf(-s);
        if x > 1.0 {
            ratio *= inv_b.powf(s);
        }
        if rng.unit() < ratio {
            return (x as u64).clamp(1, n as u64);
        }
    }
}

/// The stream: key ids, where id `k` is the `k`-th fresh key.
fn generate(args: &BenchArgs) -> (Vec<u64>, u64) {
    let mut rng = Rng(args.seed);
    let mut keys = Vec::with_capacity(args.keys as usize);
    let mut fresh = 0u64;
    for _ in 0..args.keys {
        let id = if fresh > 0 && rng.unit() < args.duplicate_ratio {
            match args.distribution {
                Distribution::Uniform => rng.below(fresh),
                Distribution::Zipf => fresh - zipf(&mut rng, fresh, args.zipf_exponent),
            }
        } else {
            fresh += 1;
            fresh - 1
        };
        keys.push(id);
    }
    (keys, fresh)
}

/// Key id → 16 letters and digits (distinct ids give distinct lines, but
/// for a 62¹⁶ ≈ 5·10²⁸ chance).
fn line_of(id: u64, seed: u64, out: &mut Vec<u8>) {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut a = mix(id ^ mix(seed));
    let mut b = mix(a ^ 0x5851_F42D_4C95_7F2D);
    for i in 0..16 {
        let word = if i < 8 { &mut a } else { &mut b };
        out.push(ALPHABET[(*word % 62) as usize]);
        *word /= 62;
    }
    out.push(b'\n');
}

/// One measurement.
struct Measurement {
    tier: BenchTier,
    threads: usize,
    elapsed: Duration,
    new: u64,
    duplicates: u64,
    expected_new: u64,
}

impl Measurement {
    fn keys_per_sec(&self, keys: u64) -> f64 {
        keys as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Exact tiers must find exactly one `New` per distinct key; the
    /// probabilistic mode misses some (its false positives).
    fn check(&self) -> String {
        match self.tier {
            BenchTier::None => format!(
                "approx ({:.2}% of keys taken for repeats)",
                self.expected_new.saturating_sub(self.new) as f64 * 100.0
                    / self.expected_new.max(1) as f64
            ),
            _ if self.new == self.expected_new => "exact".to_owned(),
            _ => "WRONG".to_owned(),
        }
    }
}

fn tier_name(t: BenchTier) -> &'static str {
    match t {
        BenchTier::Memory => "memory",
        BenchTier::Dashmap => "dashmap",
        BenchTier::None => "none (probabilistic)",
    }
}

fn measure(
    args: &BenchArgs,
    keys: &Arc<Vec<u64>>,
    distinct: u64,
    tier: BenchTier,
    threads: usize,
) -> Result<Measurement, String> {
    let expected = args.expected_keys.unwrap_or(distinct).max(1);
    let mut builder = Deduper::builder()
        .shards(args.shards)
        .expected_keys(expected);
    builder = match args.window.0 {
        Some(w) => builder.window(w),
        None => builder.no_window(),
    };
    builder = match tier {
        BenchTier::Memory => builder.exact_tier(ExactTier::Memory),
        BenchTier::Dashmap => builder.exact_tier(ExactTier::DashMap),
        BenchTier::None => builder.mode(Mode::Probabilistic),
    };
    let engine = Arc::new(builder.build().map_err(|e| e.to_string())?);
    let threads = threads.max(1);
    let per_thread = keys.len().div_ceil(threads);
    let barrier = Arc::new(Barrier::new(threads + 1));
    let batch = args.batch as usize;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (engine, keys, barrier) = (engine.clone(), keys.clone(), barrier.clone());
            std::thread::spawn(move || {
                let start = (t * per_thread).min(keys.len());
                let part = &keys[start..(start + per_thread).min(keys.len())];
                let (mut new, mut dup) = (0u64, 0u64);
                let mut tally = |v: Verdict| {
                    if v.is_new() {
                        new += 1;
                    } else if v.is_duplicate() {
                        dup += 1;
                    }
                };
                barrier.wait();
                if batch == 1 {
                    for k in part {
                        tally(engine.check(k));
                    }
                } else {
                    let mut verdicts = Vec::with_capacity(batch);
                    for keys in part.chunks(batch) {
                        engine.check_batch_into(keys, &mut verdicts);
                        verdicts.iter().copied().for_each(&mut tally);
                    }
                }
                (new, dup)
            })
        })
        .collect();
    barrier.wait();
    let started = Instant::now();
    let mut m = Measurement {
        tier,
        threads,
        elapsed: Duration::ZERO,
        new: 0,
        duplicates: 0,
        expected_new: distinct,
    };
    for h in handles {
        let (n, d) = h
            .join()
            .map_err(|_| "a benchmark thread panicked".to_owned())?;
        m.new += n;
        m.duplicates += d;
    }
    m.elapsed = started.elapsed();
    Ok(m)
}

/// Runs `dedup bench`.
pub fn run(args: &BenchArgs) -> ExitCode {
    let (keys, distinct) = generate(args);
    if args.emit_lines {
        return match emit_lines(&keys, args.seed) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
            Err(e) => {
                crate::say!("dedup bench: cannot write: {e}");
                ExitCode::from(1)
            }
        };
    }
    let keys = Arc::new(keys);
    let mut results = Vec::new();
    for &tier in &args.exact {
        for &threads in &args.threads {
            match measure(args, &keys, distinct, tier, threads) {
                Ok(m) => results.push(m),
                Err(e) => {
                    crate::say!("dedup bench: {e}");
                    return ExitCode::from(1);
                }
            }
        }
    }
    let n = args.keys;
    let distribution = match args.distribution {
        Distribution::Uniform => "uniform".to_owned(),
        Distribution::Zipf => format!("zipf(s={})", args.zipf_exponent),
    };
    let window = args.window.0.map_or_else(
        || "none".to_owned(),
        |w| humantime::format_duration(w).to_string(),
    );
    if args.json {
        let rows: Vec<serde_json::Value> = results
            .iter()
            .map(|m| {
                serde_json::json!({
                    "keys": n,
                    "distinct_keys": distinct,
                    "duplicate_ratio": args.duplicate_ratio,
                    "distribution": distribution,
                    "window": window,
                    "shards": args.shards,
                    "batch": args.batch,
                    "exact_tier": tier_name(m.tier),
                    "threads": m.threads,
                    "seconds": m.elapsed.as_secs_f64(),
                    "keys_per_second": m.keys_per_sec(n),
                    "new": m.new,
                    "duplicates": m.duplicates,
                    "check": m.check(),
                })
            })
            .collect();
        crate::tell!("{}", serde_json::Value::Array(rows));
    } else {
        crate::tell!(
            "{n} keys ({distinct} distinct, {:.0}% repeats, {distribution}), window {window}, {} shards, batch {}",
            args.duplicate_ratio * 100.0,
            args.shards,
            args.batch
        );
        crate::tell!(
            "{:<22} {:>7} {:>10} {:>11} {:>8} {:>11} {:>11}  verdicts",
            "exact tier",
            "threads",
            "seconds",
            "M keys/s",
            "ns/key",
            "new",
            "duplicates"
        );
        for m in &results {
            crate::tell!(
                "{:<22} {:>7} {:>10.3} {:>11.2} {:>8.1} {:>11} {:>11}  {}",
                tier_name(m.tier),
                m.threads,
                m.elapsed.as_secs_f64(),
                m.keys_per_sec(n) / 1e6,
                m.elapsed.as_secs_f64() * 1e9 / n as f64,
                m.new,
                m.duplicates,
                m.check()
            );
        }
    }
    if results.iter().any(|m| m.check() == "WRONG") {
        crate::say!("dedup bench: an exact tier did not find one new verdict per distinct key");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn emit_lines(keys: &[u64], seed: u64) -> io::Result<()> {
    let mut out = io::stdout().lock();
    let mut buf = Vec::with_capacity(1 << 20);
    for &id in keys {
        line_of(id, seed, &mut buf);
        if buf.len() >= 1 << 20 {
            out.write_all(&buf)?;
            buf.clear();
        }
    }
    out.write_all(&buf)?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zipf_favours_small_distances() {
        let mut rng = Rng(7);
        let samples: Vec<u64> = (0..20_000).map(|_| zipf(&mut rng, 1000, 1.0)).collect();
        assert!(samples.iter().all(|&x| (1..=1000).contains(&x)));
        let ones = samples.iter().filter(|&&x| x == 1).count() as f64 / 20_000.0;
        // P(1) = 1/H(1000) ≈ 0.1336.
        assert!((ones - 0.1336).abs() < 0.015, "{ones}");
        let mut rng = Rng(7);
        assert!((0..1000).all(|_| zipf(&mut rng, 1, 1.3) == 1));
    }

    #[test]
    fn lines_are_distinct_per_id() {
        let mut a = Vec::new();
        let mut b = Vec::new();
        line_of(1, 1, &mut a);
        line_of(2, 1, &mut b);
        assert_eq!(a.len(), 17);
        assert_ne!(a, b);
    }
}
