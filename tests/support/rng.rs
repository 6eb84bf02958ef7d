//! A seeded SplitMix64 (Steele, Lea, Flood 2014): deterministic streams
//! without a dependency, for the tests and the benchmarks.
#![allow(dead_code)] // each test crate uses a different part

pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64 <= p
    }
}

/// SplitMix64's output function: a bijection of `u64` (distinct inputs give
/// distinct, well-scattered outputs).
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `total` keys: the `distinct` keys `mix(seed ^ i)` (distinct, since `mix`
/// is a bijection), then repeats of uniformly chosen ones, shuffled
/// (Fisher–Yates) with a [`Rng`] seeded by `seed`.
pub fn shuffled_stream(seed: u64, distinct: u64, total: u64) -> Vec<u64> {
    let mut rng = Rng::new(seed);
    let mut stream: Vec<u64> = (0..distinct).map(|i| mix(seed ^ i)).collect();
    for _ in distinct..total {
        let i = rng.below(distinct);
        stream.push(stream[i as usize]);
    }
    for i in (1..stream.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        stream.swap(i, j);
    }
    stream
}
