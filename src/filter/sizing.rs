//! The false-positive formula of the register-blocked layout, and the sizing
//! that picks bits per key and probe count for a target rate.
//!
//! One generation of one block is a 64-bit word. A key sets `k` bits in it,
//! each chosen uniformly (with replacement) from six bits of the fingerprint.
//! A never-inserted key is a false positive when all `k` of its bits are set.
//! With `λ` keys per block on average, the number `j` of keys that landed in
//! the queried block is Poisson(λ), and after `j·k` uniform throws the number
//! `X` of set bits has the classical occupancy distribution, so
//!
//! ```text
//! p(λ, k) = Σⱼ Poisson(j; λ) · E[(X_{j·k} / 64)^k]
//! ```
//!
//! computed exactly below (no independence approximation). The standard
//! Bloom formula `(1 − e^{−k/b})^k` underestimates this layout's rate,
//! because keys are not spread evenly over blocks.

use std::sync::OnceLock;

/// Bits in one generation of one block.
pub const WORD_BITS: usize = 64;
/// Largest probe count (six fingerprint bits per probe, 60 of the 64 high bits).
pub const MAX_HASHES: u32 = 10;
/// Largest keys-per-block tabulated; beyond it the rate is treated as 1.
const MAX_KEYS_PER_BLOCK: usize = 320;

/// `E[(X_{j·k}/64)^k]` for every `k ≤ MAX_HASHES` and `j ≤ MAX_KEYS_PER_BLOCK`.
fn table() -> &'static [Vec<f64>] {
    static TABLE: OnceLock<Vec<Vec<f64>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        (1..=MAX_HASHES as usize)
            .map(|k| {
                // occupancy[i] = P(i bits set) after the throws made so far.
                let mut occupancy = vec![0.0f64; WORD_BITS + 1];
                occupancy[0] = 1.0;
                let mut per_j = Vec::with_capacity(MAX_KEYS_PER_BLOCK + 1);
                for j in 0..=MAX_KEYS_PER_BLOCK {
                    if j > 0 {
                        for _ in 0..k {
                            throw_one(&mut occupancy);
                        }
                    }
                    let hit: f64 = occupancy
                        .iter()
                        .enumerate()
                        .map(|(i, p)| p * (i as f64 / WORD_BITS as f64).powi(k as i32))
                        .sum();
                    per_j.push(hit);
                }
                per_j
            })
            .collect()
    })
}

/// One more uniform throw into the word: a set bit stays set with
/// probability `i/64`, a clear one becomes set with `(64−i)/64`.
fn throw_one(occupancy: &mut [f64]) {
    let m = WORD_BITS as f64;
    for i in (0..=WORD_BITS).rev() {
        let stay = occupancy[i] * (i as f64 / m);
        let from_below = if i > 0 {
            occupancy[i - 1] * ((WORD_BITS - (i - 1)) as f64 / m)
        } else {
            0.0
        };
        occupancy[i] = stay + from_below;
    }
}

/// The expected false-positive rate of one generation holding on average
/// `keys_per_block` keys per block, with `hashes` probe bits per key.
#[must_use]
pub fn generation_fpr(keys_per_block: f64, hashes: u32) -> f64 {
    assert!(
        (1..=MAX_HASHES).contains(&hashes),
        "hashes must be in 1..={MAX_HASHES}"
    );
    if keys_per_block <= 0.0 {
        return 0.0;
    }
    let row = &table()[hashes as usize - 1];
    let lambda = keys_per_block;
    // Poisson weights in log space: e^{−λ} underflows for large λ.
    let mut log_weight = -lambda;
    let mut total = 0.0;
    let mut mass = 0.0;
    for (j, hit) in row.iter().enumerate() {
        if j > 0 {
            log_weight += lambda.ln() - (j as f64).ln();
        }
        let w = log_weight.exp();
        total += w * hit;
        mass += w;
    }
    // Mass beyond the table: count it as certain false positives.
    (total + (1.0 - mass).max(0.0)).min(1.0)
}

/// Bits per key and probe count of one generation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FilterShape {
    /// Filter bits per key, per generation.
    pub bits_per_key: f64,
    /// Probe bits set per key.
    pub hashes: u32,
}

impl FilterShape {
    /// The expected false-positive rate of one generation filled to capacity.
    #[must_use]
    pub fn fpr(self) -> f64 {
        generation_fpr(WORD_BITS as f64 / self.bits_per_key, self.hashes)
    }
}

/// The smallest shape whose generation rate at capacity is at most `target`,
/// or `None` when no shape of the layout reaches it.
///
/// The search takes about 14 million instructions, and an engine asks for
/// the same few targets once per shard (and per growing layer): answers are
/// remembered for the life of the process.
#[must_use]
pub fn shape_for(target: f64) -> Option<FilterShape> {
    static KNOWN: std::sync::Mutex<Vec<(u64, Option<FilterShape>)>> =
        std::sync::Mutex::new(Vec::new());
    let key = target.to_bits();
    let known = |k: &Vec<(u64, Option<FilterShape>)>| {
        k.iter().find(|(t, _)| *t == key).map(|(_, shape)| *shape)
    };
    if let Some(shape) = known(&KNOWN.lock().unwrap_or_else(|e| e.into_inner())) {
        return shape;
    }
    let shape = search_shape(target);
    let mut k = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if known(&k).is_none() && k.len() < 1024 {
        k.push((key, shape));
    }
    shape
}

fn search_shape(target: f64) -> Option<FilterShape> {
    let mut best: Option<FilterShape> = None;
    for hashes in 1..=MAX_HASHES {
        // Rate falls as bits per key grow: bisect on bits per key in [1, 64].
        let (mut lo, mut hi) = (1.0f64, 64.0f64);
        if generation_fpr(WORD_BITS as f64 / hi, hashes) > target {
            continue;
        }
        for _ in 0..40 {
            let mid = 0.5 * (lo + hi);
            if generation_fpr(WORD_BITS as f64 / mid, hashes) <= target {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        if best.is_none_or(|b| hi < b.bits_per_key) {
            best = Some(FilterShape {
                bits_per_key: hi,
                hashes,
            });
        }
    }
    best
}

/// The classical Bloom formula `(1 − e^{−k/b})^k` for `b` bits per key.
#[must_use]
pub fn standard_bloom_fpr(bits_per_key: f64, hashes: u32) -> f64 {
    (1.0 - (-(hashes as f64) / bits_per_key).exp()).powi(hashes as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn occupancy_stays_a_distribution() {
        for row in table() {
            for &p in row {
                assert!((0.0..=1.0).contains(&p));
            }
        }
    }

    #[test]
    fn twelve_bits_per_key_is_about_one_percent() {
        // Independently computed for this layout: 12 bits/key, k=5 → 1.035%.
        let p = generation_fpr(64.0 / 12.0, 5);
        assert!((p - 0.010_35).abs() < 0.000_1, "{p}");
    }

    #[test]
    fn shapes_meet_their_targets() {
        for target in [0.05, 0.01, 0.001, 0.000_1] {
            let shape = shape_for(target).unwrap();
            assert!(shape.fpr() <= target * 1.000_01, "{target} {shape:?}");
        }
        let one_percent = shape_for(0.01).unwrap();
        assert!(one_percent.bits_per_key <= 16.0, "{one_percent:?}");
    }

    #[test]
    fn standard_formula_matches_published_table() {
        // b/k = 10/7 → 0.8%, 16/11 → 0.04% (Bloom's textbook table).
        assert!((standard_bloom_fpr(10.0, 7) - 0.008_19).abs() < 0.000_1);
        assert!((standard_bloom_fpr(16.0, 11) - 0.000_459).abs() < 0.000_02);
    }
}
