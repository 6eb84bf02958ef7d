//! Profiling harness (not documented): single checks and batches on 1.43 M keys.
use std::time::{Duration, Instant};
use tiered_dedup::Deduper;
fn main() {
    let n = 1_000_000u64;
    let keys: Vec<u64> = (0..(n * 143 / 100))
        .map(|i| (if i % 10 < 3 { i / 3 } else { i }).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .collect();
    let mode = std::env::args().nth(1).unwrap_or_default();
    for _ in 0..3 {
        let d = Deduper::builder()
            .window(Duration::from_secs(3600))
            .expected_keys(n)
            .build()
            .unwrap();
        let t = Instant::now();
        if mode == "batch" {
            let mut out = Vec::new();
            for c in keys.chunks(4096) {
                d.check_batch_into(c, &mut out);
            }
        } else {
            for k in &keys {
                std::hint::black_box(d.check(k));
            }
        }
        let e = t.elapsed();
        let s = d.stats();
        println!(
            "{mode}: {:.1} ns/key new {} dup {} fp {} over {}",
            e.as_nanos() as f64 / keys.len() as f64,
            s.new,
            s.duplicates,
            s.false_positives_caught,
            s.over_capacity
        );
    }
}
