//! The PostgreSQL exact tier against a private cluster started by the
//! test: verdicts equal the reference in owned and shared modes, a
//! restarted engine (cold filter) still rejects what was accepted before,
//! two engines sharing keys accept each key once, and bad input is a clear
//! error at build time.

#[path = "support/pg_server.rs"]
mod pg_server;
#[path = "../../../tests/support/rng.rs"]
mod rng;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use pg_server::PgServer;
use rng::Rng;
use tiered_dedup::{
    Affinity, Clock, Deduper, DeduperBuilder, ExactTier, ManualClock, Timestamp, Verdict,
};
use tiered_dedup_postgres::{PgConfig, PgError, PgTier};

fn engine(
    server: &PgServer,
    clock: &ManualClock,
    affinity: Affinity,
    window: Duration,
) -> DeduperBuilder {
    let tier = PgTier::connect(PgConfig::new(&server.url())).unwrap();
    Deduper::builder()
        .window(window)
        .expected_keys(10_000)
        .shards(4)
        .mark_batch(64)
        .affinity(affinity)
        .clock(Clock::Manual(clock.clone()))
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
}

fn reference(first: &mut HashMap<u64, u64>, window: u64, key: u64, t: u64) -> Verdict {
    match first.get(&key) {
        Some(&t0) if t < t0 + window => Verdict::Duplicate {
            first_seen: Timestamp::from_nanos(t0),
        },
        _ => {
            first.insert(key, t);
            Verdict::New
        }
    }
}

#[test]
fn smoke() {
    let server = PgServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let d = engine(&server, &clock, Affinity::Owned, Duration::from_secs(60))
        .build()
        .unwrap();
    assert!(d.check("a").is_new());
    assert!(d.check("a").is_duplicate());
    d.flush().unwrap();
    let n: i64 = server
        .client()
        .query_one("SELECT count(*) FROM td_records", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
}

/// Random batches, time crossing many slices (and so ring partitions
/// retired): verdicts equal the reference, in both modes (owned keys with
/// pipelined marks and with marks written in the engine's call).
#[test]
fn verdicts_match_the_reference_in_owned_and_shared_modes() {
    let server = PgServer::start_with(&["fsync=off", "synchronous_commit=off"]);
    let cases = [
        (Affinity::Owned, true),
        (Affinity::Shared, true),
        (Affinity::Owned, false),
    ];
    for (i, (affinity, pipelined)) in cases.into_iter().enumerate() {
        let window = Duration::from_millis(200);
        let clock = ManualClock::new(Timestamp::from_secs(1_000 + 1_000 * i as u64));
        let tier = PgTier::connect(
            PgConfig::new(&server.url())
                .prefix(&format!("v{i}"))
                .pipeline_marks(pipelined),
        )
        .unwrap();
        let d = Deduper::builder()
            .window(window)
            .expected_keys(10_000)
            .shards(4)
            .mark_batch(64)
            .affinity(affinity)
            .clock(Clock::Manual(clock.clone()))
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
            .unwrap();
        let mut rng = Rng::new(1 + i as u64);
        let mut first = HashMap::new();
        let mut ops = 0;
        while ops < 100_000 {
            clock.advance(Duration::from_micros(rng.below(2_000)));
            let keys: Vec<u64> = (0..1 + rng.below(300)).map(|_| rng.below(20_000)).collect();
            let now = clock.now().as_nanos();
            let expected: Vec<Verdict> = keys
                .iter()
                .map(|&k| reference(&mut first, window.as_nanos() as u64, k, now))
                .collect();
            let got = if keys.len() == 1 {
                vec![d.check(&keys[0])]
            } else {
                d.check_batch(&keys)
            };
            assert_eq!(got, expected, "{affinity:?} after {ops} ops");
            ops += keys.len();
        }
        let stats = d.stats();
        assert!(
            stats.rotations > 20,
            "{affinity:?}: {} rotations",
            stats.rotations
        );
    }
}

/// A new engine on the same tables (a restart: cold filter) rejects what
/// the first accepted, until a window has passed.
#[test]
fn a_restarted_engine_rejects_what_was_accepted_before() {
    let server = PgServer::start_with(&["fsync=off"]);
    let clock = ManualClock::new(Timestamp::from_secs(5_000));
    let window = Duration::from_secs(60);
    let first = engine(&server, &clock, Affinity::Owned, window)
        .build()
        .unwrap();
    let keys: Vec<u64> = (0..5_000).collect();
    assert!(first.check_batch(&keys).iter().all(|v| v.is_new()));
    first.flush().unwrap();
    drop(first);
    clock.advance(Duration::from_secs(10));
    let second = engine(&server, &clock, Affinity::Owned, window)
        .build()
        .unwrap();
    let again = second.check_batch(&keys);
    assert!(again.iter().all(|v| v.is_duplicate()), "{:?}", &again[..3]);
    assert!(second.check(&10_000u64).is_new());
    clock.advance(window);
    assert!(second.check(&1u64).is_new(), "outside the window");
}

/// Two engines sharing keys, racing on the same keys from two threads:
/// each key is `New` exactly once.
#[test]
fn two_engines_sharing_keys_accept_each_key_once() {
    let server = PgServer::start_with(&["fsync=off"]);
    let make = || {
        let tier = PgTier::connect(PgConfig::new(&server.url())).unwrap();
        Arc::new(
            Deduper::builder()
                .window(Duration::from_secs(600))
                .shards(2)
                .affinity(Affinity::Shared)
                .exact_tier(ExactTier::Custom(Arc::new(tier)))
                .build()
                .unwrap(),
        )
    };
    let (a, b) = (make(), make());
    let run = |d: Arc<Deduper>, seed: u64| {
        std::thread::spawn(move || {
            let mut rng = Rng::new(seed);
            let mut new = Vec::new();
            for _ in 0..200 {
                let keys: Vec<u64> = (0..50).map(|_| rng.below(3_000)).collect();
                for (k, v) in keys.iter().zip(d.check_batch(&keys)) {
                    if v.is_new() {
                        new.push(*k);
                    }
                    assert!(!matches!(v, Verdict::Unavailable), "{v:?}");
                }
            }
            new
        })
    };
    let (ta, tb) = (run(Arc::clone(&a), 7), run(Arc::clone(&b), 8));
    let mut all = ta.join().unwrap();
    all.extend(tb.join().unwrap());
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "a key was New twice");
    // Every key that was seen is stored; a retry of any is a duplicate (or
    // in progress while the other engine's batch holds it).
    for k in all.iter().take(100) {
        assert!(a.check(k).is_duplicate());
    }
}

#[test]
fn bad_input_is_a_clear_error_at_build_time() {
    let server = PgServer::start();
    let url = server.url();
    let e = PgTier::connect(PgConfig::new("postgresql://td@127.0.0.1:notaport/x")).unwrap_err();
    assert!(matches!(e, PgError::Config(_)), "{e}");
    // Nothing listens on port 1.
    let e = PgTier::connect(
        PgConfig::new("postgresql://td:x@127.0.0.1:1/dedup").timeout(Duration::from_secs(2)),
    )
    .unwrap_err();
    assert!(matches!(e, PgError::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("127.0.0.1:1"), "{e}");
    let wrong = url.replace(pg_server::PASSWORD, "wrong");
    let e = PgTier::connect(PgConfig::new(&wrong)).unwrap_err();
    assert!(matches!(e, PgError::Authentication { .. }), "{e}");
    assert!(
        !e.to_string().contains("wrong"),
        "no password in messages: {e}"
    );
    let e = PgTier::connect(PgConfig::new(&server.url_for("missing"))).unwrap_err();
    assert!(matches!(e, PgError::NoDatabase { .. }), "{e}");
    assert!(e.to_string().contains("missing"), "{e}");
    let e = PgTier::connect(PgConfig::new(&url).prefix("td; drop")).unwrap_err();
    assert!(matches!(e, PgError::Config(_)), "{e}");
    // Read-only by default.
    server.psql("CREATE DATABASE ro");
    server.psql("ALTER DATABASE ro SET default_transaction_read_only = on");
    let e = PgTier::connect(PgConfig::new(&server.url_for("ro"))).unwrap_err();
    assert!(matches!(e, PgError::ReadOnly { .. }), "{e}");
    // A hot standby.
    PgTier::connect(PgConfig::new(&url)).unwrap();
    let standby = server.standby();
    let e = PgTier::connect(PgConfig::new(&standby.url())).unwrap_err();
    assert!(matches!(e, PgError::ReadOnly { .. }), "{e}");
    assert!(e.to_string().contains("standby"), "{e}");
    // Check-only on a database without the tables.
    server.psql("CREATE DATABASE empty");
    let e = PgTier::connect(
        PgConfig::new(&server.url_for("empty"))
            .schema_action(tiered_dedup_postgres::SchemaAction::CheckOnly),
    )
    .unwrap_err();
    assert!(matches!(e, PgError::Schema(_)), "{e}");
    assert!(e.to_string().contains("schema_sql"), "{e}");
}

/// Engines with another slicing (window) on the same tables are refused
/// with a message, never mixed.
#[test]
fn another_window_on_the_same_tables_is_refused() {
    let server = PgServer::start_with(&["fsync=off"]);
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let a = engine(&server, &clock, Affinity::Owned, Duration::from_secs(60))
        .build()
        .unwrap();
    assert!(a.check("x").is_new());
    a.flush().unwrap();
    let b = engine(&server, &clock, Affinity::Owned, Duration::from_secs(3_600))
        .build()
        .unwrap();
    // Cold: every key is looked up, and the lookup fails with the reason.
    assert_eq!(b.check("x"), Verdict::Unavailable);
}
