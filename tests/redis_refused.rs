//! No silent loss when Redis refuses marks, against private
//! `redis-server`s: a server out of memory (`--maxmemory 2mb`, policy
//! `noeviction`) and an ACL user that may not write some keys nor run
//! scripts; and a shared engine's reads of its log while writes are
//! refused. Redis answers such writes with an error; the tier keeps those
//! marks for a retry (up to `max_unsent_marks` per shard, past which it
//! drops them and counts them), and `Deduper::flush` reports exactly how
//! many accepted keys Redis does not hold — counted in Redis by the test —
//! while a second engine finds every key that was stored.
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
mod redis_server;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use redis_server::RedisServer;
use tiered_dedup::exact::redis::{FailurePolicy, RedisConfig, RedisStats, RedisTier};
use tiered_dedup::{
    Affinity, Claim, ClaimRequest, Clock, Deduper, ExactTier, FailureCause, FlushError,
    ManualClock, Timestamp, Verdict,
};

const SHARDS: usize = 4;
const WINDOW: Duration = Duration::from_secs(600);
const FULL: &[&str] = &["--maxmemory", "2mb", "--maxmemory-policy", "noeviction"];

fn engine(
    url: &str,
    clock: &ManualClock,
    affinity: Affinity,
    configure: impl FnOnce(RedisConfig) -> RedisConfig,
) -> (Deduper, Arc<RedisStats>) {
    let tier = RedisTier::new(configure(RedisConfig {
        timeout: Duration::from_secs(2),
        policy: FailurePolicy::FailClosed,
        ..RedisConfig::new(url)
    }));
    let stats = tier.stats();
    let d = Deduper::builder()
        .window(WINDOW)
        .expected_keys(100_000)
        .shards(SHARDS)
        .mark_batch(1_000)
        .affinity(affinity)
        .clock(Clock::Manual(clock.clone()))
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    (d, stats)
}

/// `CONFIG SET name value` on the test's server.
fn config_set(admin: &mut redis::Connection, name: &str, value: impl redis::ToRedisArgs) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(name)
        .arg(value)
        .query(admin)
        .unwrap();
}

/// The distinct fingerprints Redis holds under the engines' mark keys.
fn stored_in_redis(server: &RedisServer) -> HashSet<Vec<u8>> {
    let mut conn = server.connection();
    let keys = redis_server::mark_hashes(&mut conn);
    keys.iter()
        .flat_map(|k| redis_server::stored_fingerprints(&mut conn, k))
        .collect()
}

/// Accepts `keys` (all new) in batches, then flushes: returns the flush's
/// error, which must name `cause`.
fn accept_and_flush(d: &Deduper, keys: &[u64], cause: FailureCause) -> FlushError {
    for chunk in keys.chunks(5_000) {
        let verdicts = d.check_batch(chunk);
        assert!(verdicts.iter().all(|v| v.is_new()), "{verdicts:?}");
    }
    let err = d.flush().expect_err("Redis refuses some marks");
    assert_eq!(err.cause().cause(), Some(cause), "{err}");
    err
}

/// The flush error counts exactly the accepted keys Redis does not hold,
/// and a fresh engine (its filter cold, so every key is looked up) finds
/// exactly the ones it holds.
fn assert_exact(server: &RedisServer, d: &Deduper, keys: &[u64], err: &FlushError) {
    let stored = stored_in_redis(server);
    let fp = |k: &u64| d.fingerprint(k).to_bytes().to_vec();
    let accepted: HashSet<Vec<u8>> = keys.iter().map(fp).collect();
    assert!(stored.is_subset(&accepted), "marks of keys never accepted");
    let missing = keys.len() - stored.len();
    assert!(
        !stored.is_empty() && missing > 0,
        "{} stored, {missing} missing",
        stored.len()
    );
    eprintln!(
        "{} accepted keys: {} stored in Redis, {missing} missing, {} reported unwritten ({} dropped)",
        keys.len(),
        stored.len(),
        err.unwritten(),
        err.dropped()
    );
    assert_eq!(
        err.unwritten(),
        missing as u64,
        "reported {} unwritten, {missing} missing in Redis: {err}",
        err.unwritten()
    );
    // A second engine sees every key reported stored, and no other.
    let clock = ManualClock::new(Timestamp::from_secs(1_100));
    let (second, _) = engine(&server.url(), &clock, Affinity::Owned, |c| c);
    for chunk in keys.chunks(5_000) {
        let verdicts = second.check_batch(chunk);
        for (k, v) in chunk.iter().zip(verdicts) {
            let held = stored.contains(&fp(k));
            match v {
                Verdict::Duplicate { first_seen } => {
                    assert!(held, "key {k}: a duplicate of a mark Redis does not hold");
                    assert_eq!(first_seen, Timestamp::from_secs(1_000));
                }
                Verdict::New => assert!(!held, "key {k}: stored, yet accepted again"),
                other => panic!("key {k}: {other:?}"),
            }
        }
    }
}

#[test]
fn smoke() {
    let server = RedisServer::start_with(FULL);
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (d, stats) = engine(&server.url(), &clock, Affinity::Owned, |c| c);
    assert!(d.check("k").is_new());
    d.flush().expect("room for one mark");
    assert_eq!(stats.marks_refused.load(Ordering::Relaxed), 0);
}

/// Out of memory: the first batches are stored, the later ones refused
/// (`OOM`); lookups still work. The user's report was "134,122 reported,
/// 399,985 missing"; here the two are equal.
#[test]
fn out_of_memory_marks_are_counted_exactly() {
    let server = RedisServer::start_with(FULL);
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (d, stats) = engine(&server.url(), &clock, Affinity::Owned, |c| c);
    let keys: Vec<u64> = (0..100_000).collect();
    let err = accept_and_flush(&d, &keys, FailureCause::OutOfMemory);
    assert_eq!(err.dropped(), 0, "the retry buffer holds them all");
    assert!(err.to_string().contains("out of memory"), "{err}");
    assert!(stats.marks_refused.load(Ordering::Relaxed) >= err.unwritten());
    assert_eq!(
        stats.marks_written.load(Ordering::Relaxed) + err.unwritten(),
        keys.len() as u64,
        "every mark is written or reported"
    );
    assert_exact(&server, &d, &keys, &err);
    // The kept marks are retried by every flush, and stored once there is
    // room.
    let mut admin = server.connection();
    config_set(&mut admin, "maxmemory", "0");
    d.flush().expect("room for every mark now");
    assert_eq!(stored_in_redis(&server).len(), keys.len());
}

/// Past `max_unsent_marks` per shard, refused marks are dropped: the flush
/// error counts them with the kept ones (and says how many were dropped),
/// and keeps counting them after Redis stores the kept ones, until their
/// slice leaves the window.
#[test]
fn marks_dropped_past_the_retry_buffer_are_reported() {
    let server = RedisServer::start_with(FULL);
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (d, stats) = engine(&server.url(), &clock, Affinity::Owned, |c| RedisConfig {
        max_unsent_marks: 2_000,
        ..c
    });
    let keys: Vec<u64> = (0..100_000).collect();
    let err = accept_and_flush(&d, &keys, FailureCause::OutOfMemory);
    let dropped = stats.marks_dropped.load(Ordering::Relaxed);
    assert!(dropped > 0);
    assert_eq!(err.dropped(), dropped, "{err}");
    assert!(err.to_string().contains("dropped"), "{err}");
    assert_exact(&server, &d, &keys, &err);
    // Room again: the kept marks are stored, the dropped ones stay reported.
    let mut admin = server.connection();
    config_set(&mut admin, "maxmemory", "0");
    let err = d.flush().expect_err("dropped marks are still missing");
    assert_eq!(
        (err.unwritten(), err.dropped()),
        (dropped, dropped),
        "{err}"
    );
    assert_eq!(err.cause().cause(), Some(FailureCause::RetryBufferFull));
    assert_exact(&server, &d, &keys, &err);
    // Once their slice has left the window, they no longer matter.
    clock.advance(WINDOW + Duration::from_secs(200));
    d.maintain();
    d.flush().expect("nothing inside the window is missing");
}

/// An ACL user that may write only shard 0's keys (and the shards'
/// layouts), and may not run scripts: shard 0's marks are stored, the
/// others refused (`NOPERM`), exactly counted; a shared-mode engine, whose
/// log keys for the key checked it may not write, is refused and says
/// why.
#[test]
fn an_acl_that_forbids_marks_is_counted_exactly() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("marker")
        .arg("on")
        .arg(">marker-pw")
        .arg("resetkeys")
        .arg("%R~*")
        .arg("%W~td:*:layout")
        .arg("%W~td:{*:0}:*")
        .arg("+@all")
        .arg("-evalsha")
        .arg("-eval")
        .query(&mut admin)
        .unwrap();
    let url = format!("redis://marker:marker-pw@127.0.0.1:{}", server.port);
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (d, stats) = engine(&url, &clock, Affinity::Owned, |c| c);
    let keys: Vec<u64> = (0..20_000).collect();
    let err = accept_and_flush(&d, &keys, FailureCause::PermissionDenied);
    assert!(!err.to_string().contains("marker-pw"), "{err}");
    assert!(stats.marks_refused.load(Ordering::Relaxed) > 0);
    assert_exact(&server, &d, &keys, &err);
    // Shared keys append to a shard's log, a key this user may not write
    // (but for shard 0's): refused, and the cause says so. (In a namespace
    // of their own: the layout is agreed, and may be written.)
    let tier = RedisTier::new(RedisConfig::new(&url));
    let stats = tier.stats();
    let shared = Deduper::builder()
        .window(WINDOW)
        .expected_keys(1_000)
        .namespace("claims")
        .affinity(Affinity::Shared)
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    assert!(shared.check("k").is_unavailable(), "fail closed");
    let e = stats.last_error().expect("the refusal is remembered");
    assert_eq!(e.cause(), Some(FailureCause::PermissionDenied), "{e}");
    // (The wording of the refusal differs between Redis versions.)
    assert!(e.to_string().to_lowercase().contains("key"), "{e}");
}

/// While Redis refuses marks (out of memory), lookups go on: the mark
/// connection holds its retries back (backoff) without holding back the
/// lookup connection, which reconnects at once when it is cut — a
/// reconnect only reads the layout (`GET`), which a full server answers.
#[test]
fn lookups_go_on_while_marks_are_refused() {
    let server = RedisServer::start_with(FULL);
    let mut admin = server.connection();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (d, stats) = engine(&server.url(), &clock, Affinity::Owned, |c| RedisConfig {
        timeout: Duration::from_millis(200),
        ..c
    });
    let keys: Vec<u64> = (0..100_000).collect();
    let _ = accept_and_flush(&d, &keys, FailureCause::OutOfMemory);
    // Cut every lookup connection (their last command was not a mark's).
    let me: u64 = redis::cmd("CLIENT").arg("ID").query(&mut admin).unwrap();
    let clients: String = redis::cmd("CLIENT").arg("LIST").query(&mut admin).unwrap();
    let mut cut = 0;
    for line in clients.lines() {
        let field = |name: &str| {
            line.split(' ')
                .find_map(|f| f.strip_prefix(name))
                .unwrap_or("")
                .to_owned()
        };
        let id: u64 = field("id=").parse().unwrap();
        if id != me && field("cmd=") != "append" {
            let _: () = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query(&mut admin)
                .unwrap();
            cut += 1;
        }
    }
    assert!(cut > 0, "{clients}");
    let failures = stats.failures.load(Ordering::Relaxed);
    // The first lookup of each shard finds its connection cut; the next
    // one, 20 ms later (past the 10 ms backoff), reconnects.
    let _ = d.check_batch(&keys[..1_000]);
    std::thread::sleep(Duration::from_millis(20));
    let again = d.check_batch(&keys[..1_000]);
    assert!(
        again.iter().all(|v| v.is_duplicate()),
        "lookups failed while marks were refused: {:?} (failures {} → {}, last: {:?})",
        again.iter().find(|v| !v.is_duplicate()),
        failures,
        stats.failures.load(Ordering::Relaxed),
        stats.last_error()
    );
}

/// Owned claims with results while Redis is out of memory: a body and its
/// record are written together (the body to the slice's body hash first),
/// and a commit counts stored only once both are. Refused, every commit is
/// kept and reported; once there is room the retries store them, and a
/// fresh engine (its filter cold: every key read from Redis) replays each
/// key's own result.
#[test]
fn refused_commits_keep_their_results_until_stored() {
    let server = RedisServer::start_with(FULL);
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (d, stats) = engine(&server.url(), &clock, Affinity::Owned, |c| c);
    let result = |k: u64| format!("{k:0>200}").into_bytes();
    let keys: Vec<u64> = (0..20_000).collect();
    for chunk in keys.chunks(1_000) {
        let requests: Vec<ClaimRequest<u64>> =
            chunk.iter().map(|&k| ClaimRequest::new(k)).collect();
        let commits: Vec<_> = d
            .claim_batch(&requests)
            .into_iter()
            .zip(chunk)
            .map(|(c, &k)| (c.into_lease().expect("fresh keys are acquired"), result(k)))
            .collect();
        for committed in d.commit_batch(commits) {
            committed.expect("kept until Redis stores it");
        }
    }
    let err = d.flush().expect_err("Redis refuses some commits");
    assert_eq!(
        err.cause().cause(),
        Some(FailureCause::OutOfMemory),
        "{err}"
    );
    assert!(err.unwritten() > 0);
    assert!(stats.marks_refused.load(Ordering::Relaxed) > 0);
    // Meanwhile the engine answers from what it keeps.
    for &k in keys.iter().step_by(97) {
        match d.claim(&k) {
            Claim::Completed { result: r, .. } => assert_eq!(r.as_ref(), result(k), "key {k}"),
            other => panic!("key {k}: {other:?}"),
        }
    }
    let mut admin = server.connection();
    config_set(&mut admin, "maxmemory", "0");
    d.flush().expect("room for every commit now");
    let (fresh, _) = engine(&server.url(), &clock, Affinity::Owned, |c| c);
    for chunk in keys.chunks(1_000) {
        let requests: Vec<ClaimRequest<u64>> =
            chunk.iter().map(|&k| ClaimRequest::new(k)).collect();
        for (claim, &k) in fresh.claim_batch(&requests).into_iter().zip(chunk) {
            match claim {
                Claim::Completed { result: r, .. } => {
                    assert_eq!(r.as_ref(), result(k), "key {k}");
                }
                other => panic!("key {k}: {other:?}"),
            }
        }
    }
}

/// A shared engine that only reads the log — a flush with nothing to send,
/// which catches its replica up — goes on while Redis refuses writes (out
/// of memory): a call that appends nothing writes nothing, not even the
/// log's epoch, which exists.
#[test]
fn reading_the_shared_log_goes_on_while_writes_are_refused() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let clock = ManualClock::new(Timestamp::from_secs(1_000));
    let (a, _) = engine(&server.url(), &clock, Affinity::Shared, |c| c);
    let (b, stats) = engine(&server.url(), &clock, Affinity::Shared, |c| c);
    for k in 0..200u64 {
        assert!(a.check(&k).is_new());
        assert!(b.check(&(1_000 + k)).is_new());
    }
    a.flush().expect("nothing is missing");
    b.flush().expect("nothing is missing");
    for k in 200..400u64 {
        assert!(a.check(&k).is_new());
    }
    config_set(&mut admin, "maxmemory", "1");
    config_set(&mut admin, "maxmemory-policy", "noeviction");
    b.flush().unwrap_or_else(|e| {
        panic!(
            "reading a's entries writes nothing: {e} (last error {:?})",
            stats.last_error()
        )
    });
    // A write is refused, as the policy says, and the refused transaction
    // names why (its `EXEC` answers `EXECABORT`, after the queued
    // command's `OOM`).
    assert!(b.check(&5_000u64).is_unavailable(), "fail closed");
    let e = stats.last_error().expect("the refusal is remembered");
    assert_eq!(e.cause(), Some(FailureCause::OutOfMemory), "{e}");
}
