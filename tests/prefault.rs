//! `DeduperBuilder::prefault_tables`: the memory tier's tables are faulted
//! in when the engine is built, so the checks after it take no page
//! faults, and the answers are the same as a lazy engine's.

use std::time::Duration;

use tiered_dedup::{Deduper, DeduperBuilder, Durability, Verdict};

/// Minor page faults this thread has taken so far.
#[cfg(target_os = "linux")]
fn faults() -> i64 {
    // SAFETY: getrusage writes the struct it is given.
    unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage.ru_minflt
    }
}

/// 2·10⁵ keys, every fifth a repeat of an earlier one.
fn stream() -> Vec<u64> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut keys = Vec::with_capacity(200_000);
    for i in 0..200_000u64 {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        keys.push(if i % 5 == 4 {
            keys[(state >> 33) as usize % keys.len()]
        } else {
            state
        });
    }
    keys
}

/// The three layouts of owned keys on the memory tier: one table for the
/// window, a table of every key with first-seen times, and fingerprints
/// alone.
fn builders() -> [(&'static str, DeduperBuilder); 3] {
    let sized = || Deduper::builder().expected_keys(4_000_000).shards(2);
    [
        ("window", sized().window(Duration::from_secs(3600))),
        ("no window", sized().no_window()),
        ("untimed", sized().no_window().first_seen_times(false)),
    ]
}

/// Faults the calling thread takes checking `keys` in batches of 4096
/// (every buffer allocated and touched beforehand), and which keys were
/// new.
fn checked(engine: &Deduper, keys: &[u64]) -> (i64, Vec<bool>) {
    let mut out = vec![Verdict::New; 4096];
    let mut new = vec![true; keys.len()];
    let before = faults();
    for (batch, new) in keys.chunks(4096).zip(new.chunks_mut(4096)) {
        out.clear();
        engine.check_batch_into(batch, &mut out);
        for (n, v) in new.iter_mut().zip(&out) {
            *n = v.is_new();
        }
    }
    (faults() - before, new)
}

#[test]
#[cfg(target_os = "linux")]
fn checks_on_prefaulted_tables_take_no_page_faults() {
    let keys = stream();
    for (name, builder) in builders() {
        let lazy = builder.clone().build().expect("lazy engine");
        let eager = builder
            .prefault_tables(true)
            .build()
            .expect("prefaulted engine");
        // The second pass finds every key recorded: its faults are the
        // engine's own (the allocator handing back scratch memory), and
        // the first pass's excess over them is the tables' first touch.
        let (lazy_faults, lazy_verdicts) = checked(&lazy, &keys);
        let lazy_faults = lazy_faults - checked(&lazy, &keys).0;
        let (eager_faults, eager_verdicts) = checked(&eager, &keys);
        let eager_faults = eager_faults - checked(&eager, &keys).0;
        // Two tables of 20–60 MB: at least 20 huge pages, or thousands
        // of small ones, touched lazily.
        assert!(
            lazy_faults >= 16,
            "{name}: only {lazy_faults} faults checking a lazy engine"
        );
        assert!(
            eager_faults <= 4,
            "{name}: {eager_faults} faults on prefaulted tables, {lazy_faults} lazily"
        );
        assert_eq!(lazy_verdicts.len(), eager_verdicts.len());
        assert!(
            lazy_verdicts == eager_verdicts,
            "{name}: the answers differ"
        );
        let news = eager_verdicts.iter().filter(|&&n| n).count();
        assert!(news > 150_000 && news < 170_000, "{name}: {news} new");
        assert_eq!(
            eager.stats().exact_bytes,
            lazy.stats().exact_bytes,
            "{name}"
        );
    }
}

/// A durable engine faults its tables in after recovery: the recovered keys
/// are still duplicates and the checks after it take no faults on the
/// tables (which recovery touched only where its few keys went).
#[test]
#[cfg(target_os = "linux")]
fn a_durable_engine_prefaults_after_recovery() {
    let keys = stream();
    let builder = || {
        Deduper::builder()
            .expected_keys(4_000_000)
            .shards(2)
            .window(Duration::from_secs(3600))
            .durability(Durability::Os)
    };
    let table_faults = |prefault: bool| {
        let dir = tempfile::tempdir().expect("temporary directory");
        {
            let first = builder().open(dir.path()).expect("open");
            let (_, new) = checked(&first, &keys[..10]);
            assert!(new.iter().any(|&n| n));
        }
        let reopened = builder()
            .prefault_tables(prefault)
            .open(dir.path())
            .expect("reopen");
        let (faults, new) = checked(&reopened, &keys[..100_000]);
        let faults = faults - checked(&reopened, &keys[..100_000]).0;
        assert!(
            new[..10].iter().all(|&n| !n),
            "recovered keys are duplicates"
        );
        assert!(new[10..].iter().any(|&n| n));
        faults
    };
    // The log's buffers fault as they fill, either way; two tables of
    // 60 MB that recovery touched in 10 places fault at least 20 more
    // times lazily.
    let (lazy, eager) = (table_faults(false), table_faults(true));
    assert!(
        eager + 20 <= lazy,
        "{eager} faults after a prefaulted recovery, {lazy} lazily"
    );
}
