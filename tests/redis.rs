//! The Redis exact tier against a private `redis-server`: verdicts equal the
//! reference in owned and shared modes; two engines sharing keys accept each
//! key once; a restarted engine (cold filter) still rejects what was
//! accepted before.
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/rng.rs"]
mod rng;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis_server::RedisServer;
use rng::Rng;
use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{
    Affinity, Clock, ConfigError, Deduper, DeduperBuilder, ExactTier, ManualClock, Timestamp,
    Verdict,
};

fn engine(
    server: &RedisServer,
    clock: &ManualClock,
    affinity: Affinity,
    window: Duration,
) -> DeduperBuilder {
    // No fault is injected here: a request slower than the default 500 ms
    // (a loaded machine) must not turn a verdict into `Unavailable`.
    let tier = RedisTier::new(RedisConfig {
        timeout: Duration::from_secs(10),
        ..RedisConfig::new(&server.url())
    });
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
    let server = RedisServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let d = engine(&server, &clock, Affinity::Owned, Duration::from_secs(60))
        .build()
        .unwrap();
    assert!(d.check("a").is_new());
    assert!(d.check("a").is_duplicate());
}

/// Random batches through Redis, time crossing many slices (and so many
/// Redis hashes): verdicts equal the reference, in both modes.
#[test]
fn verdicts_match_the_reference_in_owned_and_shared_modes() {
    for affinity in [Affinity::Owned, Affinity::Shared] {
        let server = RedisServer::start();
        let window = Duration::from_millis(200);
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let d = engine(&server, &clock, affinity, window).build().unwrap();
        let mut rng = Rng::new(1);
        let mut first = HashMap::new();
        let mut ops = 0;
        while ops < 200_000 {
            clock.advance(Duration::from_micros(rng.below(2_000)));
            let keys: Vec<u64> = (0..1 + rng.below(300)).map(|_| rng.below(20_000)).collect();
            let now = clock.now().as_nanos();
            let expected: Vec<Verdict> = keys
                .iter()
                .map(|&k| reference(&mut first, window.as_nanos() as u64, k, now))
                .collect();
            assert_eq!(d.check_batch(&keys), expected, "{affinity:?} at op {ops}");
            ops += keys.len();
        }
        assert!(d.stats().rotations >= 100);
    }
}

/// Two engines on one Redis, shared mode, overlapping keys from two
/// threads: exactly one `New` per key.
#[test]
fn two_engines_sharing_keys_accept_each_once() {
    let server = RedisServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let a = engine(&server, &clock, Affinity::Shared, Duration::from_secs(600))
        .build()
        .unwrap();
    let b = engine(&server, &clock, Affinity::Shared, Duration::from_secs(600))
        .build()
        .unwrap();
    let news: Vec<Vec<u64>> = std::thread::scope(|s| {
        [&a, &b]
            .into_iter()
            .enumerate()
            .map(|(i, d)| {
                s.spawn(move || {
                    let mut rng = Rng::new(i as u64);
                    let mut news = Vec::new();
                    for _ in 0..200 {
                        let keys: Vec<u64> = (0..100).map(|_| rng.below(10_000)).collect();
                        for (k, v) in keys.iter().zip(d.check_batch(&keys)) {
                            assert!(!v.is_unavailable());
                            if v.is_new() {
                                news.push(*k);
                            }
                        }
                    }
                    news
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect()
    });
    let mut count: HashMap<u64, u32> = HashMap::new();
    for k in news.into_iter().flatten() {
        *count.entry(k).or_default() += 1;
    }
    assert!(count.len() > 5_000);
    assert!(
        count.values().all(|&n| n == 1),
        "a key was accepted by both engines"
    );
}

/// Engine A marks keys (owned mode, asynchronous marks) and stops; a fresh
/// engine B on the same Redis, with a cold filter, rejects them.
#[test]
fn a_restarted_engine_rejects_what_was_accepted_before() {
    let server = RedisServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let window = Duration::from_secs(600);
    let a = engine(&server, &clock, Affinity::Owned, window)
        .build()
        .unwrap();
    let keys: Vec<u64> = (0..50_000).collect();
    assert!(a.check_batch(&keys).iter().all(|v| v.is_new()));
    a.flush().expect("a healthy tier stores every mark");
    drop(a);
    clock.advance(Duration::from_secs(10));
    let b = engine(&server, &clock, Affinity::Owned, window)
        .build()
        .unwrap();
    let verdicts = b.check_batch(&keys);
    assert!(
        verdicts
            .iter()
            .all(|v| v.first_seen() == Some(Timestamp::from_secs(1_000))),
        "a key accepted before the restart was accepted again"
    );
    // Every mark is in Redis: count the records.
    let mut conn = server.connection();
    let keys = redis_server::mark_hashes(&mut conn);
    assert_eq!(redis_server::count_marks(&mut conn, &keys), 50_000);
}

/// Marks are written on a connection of their own and their replies read
/// with the next write, so a lookup may reach Redis before marks sent just
/// earlier are stored: the marks in flight must answer it. A big flush
/// (tens of milliseconds of Redis work) is followed at once by repeats of
/// its keys.
#[test]
fn marks_in_flight_answer_lookups() {
    let server = RedisServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let d = engine(&server, &clock, Affinity::Owned, Duration::from_secs(600))
        .shards(1)
        .expected_keys(200_000)
        .mark_batch(100_000)
        .build()
        .unwrap();
    for round in 0..3u64 {
        let keys: Vec<u64> = (round * 100_000..(round + 1) * 100_000).collect();
        // The 100 000th new key fills the batch: its marks are sent.
        assert!(d.check_batch(&keys).iter().all(|v| v.is_new()));
        let again: Vec<u64> = keys.iter().step_by(7).copied().collect();
        let verdicts = d.check_batch(&again);
        let accepted_again = verdicts.iter().filter(|v| !v.is_duplicate()).count();
        assert_eq!(
            accepted_again, 0,
            "round {round}: repeats of keys in flight accepted"
        );
    }
    d.flush().expect("a healthy tier stores every mark");
}

/// An owned engine whose filter is warm (a window has passed since it
/// started), on one shard with marks flushed 1000 at a time.
fn warm_engine(server: &RedisServer, clock: &ManualClock, tier: RedisTier) -> Deduper {
    let window = Duration::from_secs(600);
    let d = engine(server, clock, Affinity::Owned, window)
        .shards(1)
        .mark_batch(1_000)
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    d.check(&u64::MAX);
    d.flush().expect("a healthy tier stores every mark");
    clock.advance(window + Duration::from_secs(1));
    d.maintain();
    d
}

/// Records stored in the record strings, copies included.
fn records_stored(conn: &mut redis::Connection) -> u64 {
    redis_server::mark_hashes(conn)
        .iter()
        .map(|k| redis::cmd("STRLEN").arg(k).query::<u64>(conn).unwrap() / 24)
        .sum()
}

/// The last batch of marks is acknowledged once the engine is idle for the
/// flush interval (`maintain`), not only when more marks come.
#[test]
fn an_idle_engine_settles_its_last_marks() {
    let server = RedisServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let tier = RedisTier::new(RedisConfig::new(&server.url()));
    let stats = tier.stats();
    let d = warm_engine(&server, &clock, tier);
    let written = stats.marks_written.load(Ordering::Relaxed);
    let keys: Vec<u64> = (0..1_000).collect();
    assert!(d.check_batch(&keys).iter().all(|v| v.is_new()));
    assert_eq!(
        stats.marks_unsent.load(Ordering::Relaxed),
        1_000,
        "in flight"
    );
    std::thread::sleep(Duration::from_millis(30));
    d.maintain();
    assert_eq!(stats.marks_unsent.load(Ordering::Relaxed), 0);
    assert_eq!(stats.marks_written.load(Ordering::Relaxed), written + 1_000);
}

/// A failed lookup drops the lookup connection only: marks in flight on
/// the other one are still answered, the next batch is written, and no
/// record is written twice.
#[test]
fn a_failed_lookup_leaves_the_marks_alone() {
    let server = RedisServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let tier = RedisTier::new(RedisConfig::new(&server.url()));
    let stats = tier.stats();
    let d = warm_engine(&server, &clock, tier);
    let mut conn = server.connection();
    let before = records_stored(&mut conn);
    let first: Vec<u64> = (0..1_000).collect();
    assert!(d.check_batch(&first).iter().all(|v| v.is_new()));
    // Kill the engine's lookup connection (its last command was not a
    // mark's or a compaction's); leave the mark connection and ours.
    let me: u64 = redis::cmd("CLIENT").arg("ID").query(&mut conn).unwrap();
    let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut conn).unwrap();
    let mut killed = 0;
    for line in clients.lines() {
        let field = |name: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or("")
                .to_owned()
        };
        let id: u64 = field("id=").parse().unwrap();
        if id != me && !matches!(field("cmd=").as_str(), "append" | "pexpire" | "eval") {
            let _: () = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query(&mut conn)
                .unwrap();
            killed += 1;
        }
    }
    assert_eq!(killed, 1, "{clients}");
    let repeats = d.check_batch(&first[..100]);
    assert!(repeats.iter().all(|v| v.is_unavailable()), "{repeats:?}");
    std::thread::sleep(Duration::from_millis(50));
    let second: Vec<u64> = (1_000..2_000).collect();
    assert!(d.check_batch(&second).iter().all(|v| v.is_new()));
    d.flush().expect("a healthy tier stores every mark");
    assert_eq!(d.stats().mark_errors, 0);
    assert_eq!(stats.marks_unsent.load(Ordering::Relaxed), 0);
    assert_eq!(
        records_stored(&mut conn) - before,
        2_000,
        "records written twice"
    );
}

/// Record strings of a slice that stopped filling are rewritten at their
/// exact size: `APPEND` grows a string by doubling, so before that they
/// hold up to twice their bytes.
#[test]
fn finished_slices_are_compacted() {
    let server = RedisServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let d = engine(&server, &clock, Affinity::Owned, Duration::from_secs(600))
        .shards(1)
        .mark_batch(50)
        .build()
        .unwrap();
    let mut conn = server.connection();
    // Bytes Redis uses for the strings of `slice`, and their lengths.
    let usage = |conn: &mut redis::Connection, slice: &str| {
        let mut used = 0u64;
        let mut len = 0u64;
        for k in redis_server::mark_hashes(conn)
            .iter()
            .filter(|k| redis_server::slice_of(k) == slice)
        {
            used += redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(k)
                .arg("SAMPLES")
                .arg(0)
                .query::<u64>(conn)
                .unwrap();
            len += redis::cmd("STRLEN").arg(k).query::<u64>(conn).unwrap();
        }
        (used, len)
    };
    let keys: Vec<u64> = (0..20_000).collect();
    for chunk in keys.chunks(500) {
        assert!(d.check_batch(chunk).iter().all(|v| v.is_new()));
    }
    d.flush().expect("a healthy tier stores every mark");
    let slices: Vec<String> = redis_server::mark_hashes(&mut conn)
        .iter()
        .map(|k| redis_server::slice_of(k).to_owned())
        .collect();
    let first = slices.iter().min().unwrap().clone();
    assert!(slices.iter().all(|s| *s == first), "one slice so far");
    let (used, len) = usage(&mut conn, &first);
    assert_eq!(len, 20_000 * 24);
    assert!(
        used as f64 > 1.2 * len as f64,
        "grown by doubling: {used} for {len}"
    );
    // The next slice: its first flush compacts the first slice's strings.
    clock.advance(Duration::from_secs(200));
    let more: Vec<u64> = (20_000..21_000).collect();
    assert!(d.check_batch(&more).iter().all(|v| v.is_new()));
    d.flush().expect("a healthy tier stores every mark");
    let (used, len) = usage(&mut conn, &first);
    assert_eq!(len, 20_000 * 24, "same records");
    assert!(
        used as f64 <= 1.1 * len as f64,
        "compacted: {used} for {len}"
    );
    assert!(d.check_batch(&keys).iter().all(|v| v.is_duplicate()));
}

/// The hashes a slice is cut into are agreed in Redis: an engine sized for
/// far fewer keys (another hash count of its own) adopts the first engine's
/// count and finds every key it marked. The hashes stay in Redis's compact
/// encoding at the expected rate.
#[test]
fn an_engine_sized_differently_finds_the_keys_of_the_first() {
    let server = RedisServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let window = Duration::from_secs(600);
    let sized = |expected: u64| {
        engine(&server, &clock, Affinity::Owned, window)
            .expected_keys(expected)
            .build()
            .unwrap()
    };
    let a = sized(1_000_000);
    let keys: Vec<u64> = (0..20_000).collect();
    assert!(a.check_batch(&keys).iter().all(|v| v.is_new()));
    a.flush().expect("a healthy tier stores every mark");
    drop(a);
    let mut conn = server.connection();
    let strings = redis_server::mark_hashes(&mut conn);
    assert!(strings.len() > 4 * 100, "{} record strings", strings.len());
    for h in strings.iter().take(20) {
        let kind: String = redis::cmd("TYPE").arg(h).query(&mut conn).unwrap();
        assert_eq!(kind, "string", "{h}");
    }
    clock.advance(Duration::from_secs(10));
    let b = sized(1_000);
    let verdicts = b.check_batch(&keys);
    assert!(
        verdicts
            .iter()
            .all(|v| v.first_seen() == Some(Timestamp::from_secs(1_000))),
        "a key marked by the first engine was accepted again"
    );
}

/// `keys_per_hash: 0` keeps one hash per (shard, slice): fewer, larger
/// hashes, still exact across a restart.
#[test]
fn one_hash_per_slice_on_request() {
    let server = RedisServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let build = || {
        let tier = RedisTier::new(RedisConfig {
            keys_per_hash: Some(0),
            ..RedisConfig::new(&server.url())
        });
        engine(&server, &clock, Affinity::Owned, Duration::from_secs(600))
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
            .unwrap()
    };
    let a = build();
    let keys: Vec<u64> = (0..5_000).collect();
    assert!(a.check_batch(&keys).iter().all(|v| v.is_new()));
    a.flush().expect("a healthy tier stores every mark");
    drop(a);
    let mut conn = server.connection();
    assert_eq!(
        redis_server::mark_hashes(&mut conn).len(),
        4,
        "one per shard"
    );
    let b = build();
    assert!(b.check_batch(&keys).iter().all(|v| v.is_duplicate()));
}

/// The layout (hashes or record strings) is agreed like the hash count:
/// an owned engine whose own choice is record strings adopts the hashes an
/// earlier engine wrote, and the other way round, and finds every key; a
/// shared engine cannot claim keys in record strings and says so.
#[test]
fn engines_adopt_the_layout_of_the_first() {
    let keys: Vec<u64> = (0..5_000).collect();
    for first_hashes in [true, false] {
        let server = RedisServer::start();
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let build = |hashes: bool| {
            let tier = RedisTier::new(RedisConfig {
                keys_per_hash: hashes.then_some(0),
                ..RedisConfig::new(&server.url())
            });
            engine(&server, &clock, Affinity::Owned, Duration::from_secs(600))
                .exact_tier(ExactTier::Custom(Arc::new(tier)))
                .build()
                .unwrap()
        };
        let a = build(first_hashes);
        assert!(a.check_batch(&keys).iter().all(|v| v.is_new()));
        a.flush().expect("a healthy tier stores every mark");
        drop(a);
        clock.advance(Duration::from_secs(1));
        let b = build(!first_hashes);
        let more: Vec<u64> = (5_000..6_000).collect();
        assert!(b.check_batch(&more).iter().all(|v| v.is_new()));
        b.flush().expect("a healthy tier stores every mark");
        assert!(
            b.check_batch(&keys)
                .iter()
                .all(|v| v.first_seen() == Some(Timestamp::from_secs(1_000))),
            "first wrote hashes: {first_hashes}"
        );
        let mut conn = server.connection();
        let marks = redis_server::mark_hashes(&mut conn);
        for k in &marks {
            let kind: String = redis::cmd("TYPE").arg(k).query(&mut conn).unwrap();
            assert_eq!(kind == "hash", first_hashes, "{k}: {kind}");
        }
        assert_eq!(redis_server::count_marks(&mut conn, &marks), 6_000);
        if !first_hashes {
            let shared = engine(&server, &clock, Affinity::Shared, Duration::from_secs(600))
                .build()
                .unwrap();
            assert!(
                shared.check_batch(&keys).iter().all(|v| v.is_unavailable()),
                "a shared engine claimed keys in record strings"
            );
        }
    }
}

/// By default shared keys keep one hash per slice (each claim looks a new
/// key up in every live slice: a miss in a compact hash scans all of it),
/// owned keys many small record strings.
#[test]
fn the_default_layout_follows_the_affinity() {
    for (affinity, one_per_shard) in [(Affinity::Shared, true), (Affinity::Owned, false)] {
        let server = RedisServer::start();
        let clock = ManualClock::new(Timestamp::from_secs(1_000));
        let d = engine(&server, &clock, affinity, Duration::from_secs(600))
            .expected_keys(100_000)
            .build()
            .unwrap();
        let keys: Vec<u64> = (0..5_000).collect();
        assert!(d.check_batch(&keys).iter().all(|v| v.is_new()));
        d.flush().expect("a healthy tier stores every mark");
        let mut conn = server.connection();
        let hashes = redis_server::mark_hashes(&mut conn).len();
        assert_eq!(hashes == 4, one_per_shard, "{affinity:?}: {hashes} hashes");
    }
}

/// Event time: a second run replaying the same events on the same Redis
/// finds the records the first run still keeps. A fresh filter under event
/// time is never trusted (a replay meets records accepted after its own
/// start); before, it was trusted once a span of event time had passed, and
/// the second run accepted every event again.
#[test]
fn an_event_time_replay_finds_what_the_first_run_kept() {
    let server = RedisServer::start();
    let base = 1_700_000_000u64;
    let events: Vec<(u64, Timestamp)> = (0..1_000u64)
        .map(|i| (i, Timestamp::from_secs(base + i)))
        .collect();
    let run = || {
        let tier = RedisTier::new(RedisConfig::new(&server.url()));
        let d = Deduper::builder()
            .window(Duration::from_secs(60))
            .expected_keys(1_000)
            .shards(4)
            .mark_batch(256)
            .clock(Clock::EventTime)
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
            .unwrap();
        let verdicts: Vec<Verdict> = events
            .chunks(100)
            .flat_map(|chunk| d.check_batch_at(chunk))
            .collect();
        d.flush().expect("a healthy tier stores every mark");
        verdicts
    };
    assert!(run().iter().all(|v| v.is_new()));
    let again = run();
    // The first run keeps at least the last window's records (it drops
    // slices a span behind its watermark).
    for (i, v) in again.iter().enumerate().skip(1_000 - 60) {
        assert!(v.is_duplicate(), "event {i}: {v:?}");
    }
}

/// The TTL (ms) of every mark key; `-1` for none.
fn ttls(server: &RedisServer) -> Vec<i64> {
    let mut conn = server.connection();
    redis_server::mark_hashes(&mut conn)
        .iter()
        .map(|k| redis::cmd("PTTL").arg(k).query::<i64>(&mut conn).unwrap())
        .collect()
}

/// Without a window keys never expire: no TTL on any mark key, owned
/// (record strings) or shared (hashes, written by the claim script).
#[test]
fn without_a_window_keys_never_expire() {
    for affinity in [Affinity::Owned, Affinity::Shared] {
        let server = RedisServer::start();
        let tier = RedisTier::new(RedisConfig::new(&server.url()));
        let d = Deduper::builder()
            .no_window()
            .expected_keys(10_000)
            .shards(4)
            .affinity(affinity)
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
            .unwrap();
        let keys: Vec<u64> = (0..5_000).collect();
        assert!(d.check_batch(&keys).iter().all(|v| v.is_new()));
        d.flush().expect("stored");
        let ttls = ttls(&server);
        assert!(!ttls.is_empty());
        assert!(ttls.iter().all(|&t| t == -1), "{affinity:?}: {ttls:?}");
    }
}

/// With a window, a TTL shorter than the window plus lateness plus a slice
/// would let Redis drop keys still inside their window (a key accepted at
/// the end of its bucket's slice lives a slice longer than the bucket's
/// first write): the builder refuses it, naming the least it accepts.
#[test]
fn a_ttl_shorter_than_the_window_is_refused() {
    let server = RedisServer::start();
    let engine = |ttl: Duration| {
        let tier = RedisTier::new(RedisConfig {
            ttl: Some(ttl),
            ..RedisConfig::new(&server.url())
        });
        Deduper::builder()
            .window(Duration::from_secs(600))
            .expected_keys(1_000)
            .shards(2)
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
    };
    for ttl in [Duration::from_secs(300), Duration::from_secs(600)] {
        match engine(ttl) {
            Err(ConfigError::ExactTierRefused { tier, reason }) => {
                assert_eq!(tier, "redis");
                assert!(reason.contains("shorter than the window"), "{reason}");
            }
            Err(other) => panic!("{ttl:?}: {other}"),
            Ok(_) => panic!("{ttl:?}: accepted"),
        }
    }
    let d = engine(Duration::from_secs(900)).expect("a TTL past the window and a slice");
    assert!(d.check(&1u64).is_new());
    d.flush().unwrap();
}

/// Without a window, `ttl` is a retention: every write of a bucket renews
/// it, so a key is kept at least that long after it was accepted. With a
/// window, the default TTL is a backstop of at least an hour.
#[test]
fn a_retention_without_a_window_is_renewed_by_every_write() {
    let server = RedisServer::start();
    let retention = Duration::from_secs(100);
    let tier = RedisTier::new(RedisConfig {
        ttl: Some(retention),
        keys_per_hash: Some(0),
        ..RedisConfig::new(&server.url())
    });
    let d = Deduper::builder()
        .no_window()
        .expected_keys(10_000)
        .shards(1)
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    assert!(d.check_batch(&[1u64, 2, 3]).iter().all(|v| v.is_new()));
    d.flush().expect("stored");
    let first = ttls(&server);
    assert_eq!(first.len(), 1, "one hash");
    assert!((99_000..=100_000).contains(&first[0]), "{first:?}");
    std::thread::sleep(Duration::from_millis(1_100));
    assert!(d.check(&4u64).is_new());
    d.flush().expect("stored");
    let renewed = ttls(&server)[0];
    assert!(
        renewed > first[0] - 500,
        "{renewed} after {first:?}: not renewed"
    );
    // With a window: the backstop.
    let server = RedisServer::start();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let d = engine(&server, &clock, Affinity::Owned, Duration::from_secs(60))
        .build()
        .unwrap();
    assert!(d.check("k").is_new());
    d.flush().expect("stored");
    let ttls = ttls(&server);
    assert!(
        ttls.iter().all(|&t| (3_599_000..=3_600_000).contains(&t)),
        "{ttls:?}"
    );
}

/// Write-through marks (`mark_batch(1)`, the builder's default) are filed
/// under the slice current when their key was accepted, not an older one
/// sharing its slot: a key accepted most of a window after the first one
/// is still a duplicate, for a restarted engine (a cold filter asks Redis),
/// once the first key's slice has expired. (The partition learnt the
/// current slice from lookups and batches only, so a warm engine's
/// write-through marks went to the slice of the last lookup.)
#[test]
fn write_through_marks_land_in_their_own_slice() {
    let server = RedisServer::start();
    let t0 = Timestamp::from_secs(1_000);
    let clock = ManualClock::new(t0);
    let window = Duration::from_secs(600);
    let build = || {
        engine(&server, &clock, Affinity::Owned, window)
            .shards(1)
            .mark_batch(1)
            .build()
            .unwrap()
    };
    let a = build();
    // Warm: a window has passed since it started, so a definitely-new
    // answer of the filter is final and Redis is only written.
    a.check(&u64::MAX);
    clock.advance(window + Duration::from_secs(1));
    a.maintain();
    let early: Vec<u64> = (0..100).collect();
    assert!(a.check_batch(&early).iter().all(|v| v.is_new()));
    // Most of a window later, across several rotations.
    clock.advance(window * 9 / 10);
    let late_at = clock.now();
    let late: Vec<u64> = (1_000..1_100).collect();
    assert!(a.check_batch(&late).iter().all(|v| v.is_new()));
    a.flush().expect("a healthy tier stores every mark");
    drop(a);
    // The early keys' window is over, the late ones' is not.
    clock.advance(window / 2);
    let b = build();
    let verdicts = b.check_batch(&late);
    let wrong: Vec<_> = late
        .iter()
        .zip(&verdicts)
        .filter(|(_, v)| v.first_seen() != Some(late_at))
        .collect();
    assert!(
        wrong.is_empty(),
        "{} of {} keys accepted inside their window lost their mark, e.g. {:?}",
        wrong.len(),
        late.len(),
        wrong.first()
    );
}
