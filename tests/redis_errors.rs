//! Errors that name their cause, against private `redis-server`s: each
//! failure the tier meets ends in an [`ExactTierError::Remote`] whose
//! cause, server and message say what happened — nothing listening, a
//! wrong or missing password, a stopped server, a server loading its data,
//! a failing script — and whose server never shows the password. The
//! error reaches the program through [`Deduper::flush`]'s `FlushError` and
//! [`RedisStats::last_error`].
#![cfg(feature = "redis")]

#[path = "support/redis_server.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis_server::RedisServer;
use tiered_dedup::exact::redis::{FailurePolicy, RedisConfig, RedisStats, RedisTier};
use tiered_dedup::{
    Affinity, Claim, Clock, Deduper, ExactTier, ExactTierError, FailureCause, ManualClock,
    Timestamp,
};

const TIMEOUT: Duration = Duration::from_millis(200);

/// A fresh engine (its filter is cold: every key is confirmed in Redis)
/// on `url`, failing closed.
fn engine(url: &str, affinity: Affinity) -> (Deduper, Arc<RedisStats>) {
    let tier = RedisTier::new(RedisConfig {
        timeout: TIMEOUT,
        policy: FailurePolicy::FailClosed,
        ..RedisConfig::new(url)
    });
    let stats = tier.stats();
    let d = Deduper::builder()
        .window(Duration::from_secs(60))
        .expected_keys(10_000)
        .shards(2)
        .affinity(affinity)
        .clock(Clock::Manual(ManualClock::new(Timestamp::from_secs(1_000))))
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    (d, stats)
}

/// Checks a key (which needs Redis: the filter is cold) and returns the
/// tier's last error, which must be a remote one from `server`.
fn failure_of_a_check(d: &Deduper, stats: &RedisStats, server: &str) -> ExactTierError {
    assert!(d.check("k").is_unavailable(), "fail closed");
    let e = stats.last_error().expect("a failure is remembered");
    assert_eq!(e.server(), Some(server), "{e}");
    e
}

#[test]
fn smoke() {
    let server = RedisServer::start();
    let (d, stats) = engine(&server.url(), Affinity::Owned);
    assert!(d.check("k").is_new());
    d.flush().expect("a healthy server stores every mark");
    assert!(d.check("k").is_duplicate());
    assert_eq!(stats.last_error(), None);
}

#[test]
fn nothing_listening_is_connection_refused() {
    let url = format!("redis://127.0.0.1:{}", RedisServer::unused_port());
    let (d, stats) = engine(&url, Affinity::Owned);
    let e = failure_of_a_check(&d, &stats, &url);
    assert_eq!(e.cause(), Some(FailureCause::ConnectionRefused), "{e}");
    let said = e.to_string();
    assert!(
        said.contains(&url) && said.contains("connection refused"),
        "{said}"
    );
}

/// Marks that cannot be written say why through `Deduper::flush`.
#[test]
fn flush_says_why_marks_are_not_stored() {
    let url = format!("redis://127.0.0.1:{}", RedisServer::unused_port());
    let tier = RedisTier::new(RedisConfig {
        timeout: TIMEOUT,
        policy: FailurePolicy::FailOpen,
        ..RedisConfig::new(&url)
    });
    let d = Deduper::builder()
        .window(Duration::from_secs(60))
        .expected_keys(10_000)
        .shards(2)
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    assert!(d.check("k").is_new(), "fail open");
    let err = d.flush().expect_err("nothing is stored");
    assert_eq!((err.unwritten(), err.dropped()), (1, 0), "{err}");
    let tiered_dedup::FlushError::Unwritten { source, .. } = &err else {
        panic!("{err}");
    };
    assert_eq!(
        source.cause(),
        Some(FailureCause::ConnectionRefused),
        "{err}"
    );
    let said = err.to_string();
    assert!(
        said.contains(&url) && said.contains("connection refused"),
        "{said}"
    );
}

#[test]
fn a_wrong_or_missing_password_is_authentication_failed() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret-pw"]);
    for url in [
        format!("redis://:not-the-pw@127.0.0.1:{}", server.port),
        format!("redis://127.0.0.1:{}", server.port),
    ] {
        let (d, stats) = engine(&url, Affinity::Owned);
        let shown = url.replace("not-the-pw", "***");
        let e = failure_of_a_check(&d, &stats, &shown);
        assert_eq!(e.cause(), Some(FailureCause::AuthenticationFailed), "{e}");
        let said = e.to_string();
        assert!(said.contains("authentication failed"), "{said}");
        assert!(
            !said.contains("not-the-pw"),
            "the password is shown: {said}"
        );
    }
    // The right one works.
    let (d, _) = engine(&server.url(), Affinity::Owned);
    assert!(d.check("k").is_new());
}

#[test]
fn a_stopped_server_is_a_timeout() {
    let server = RedisServer::start();
    let (d, stats) = engine(&server.url(), Affinity::Owned);
    assert!(d.check("warm").is_new());
    server.pause();
    let e = failure_of_a_check(&d, &stats, &server.url());
    server.resume();
    assert_eq!(e.cause(), Some(FailureCause::Timeout), "{e}");
    assert!(
        e.to_string().contains("no answer within the timeout"),
        "{e}"
    );
}

/// A server loading its data set (here slowed to 0.2 ms per key) answers
/// `LOADING` until it is done.
#[test]
fn a_loading_server_says_so() {
    let mut server = RedisServer::start();
    let mut admin = server.connection();
    let _: () = redis::cmd("EVAL")
        .arg("for i = 1, 10000 do redis.call('SET', 'filler:' .. i, i) end")
        .arg(0)
        .query(&mut admin)
        .unwrap();
    let _: () = redis::cmd("SAVE").query(&mut admin).unwrap();
    server.restart_with(&[
        "--key-load-delay",
        "200",
        "--loading-process-events-interval-bytes",
        "1024",
    ]);
    let (d, stats) = engine(&server.url(), Affinity::Owned);
    let e = failure_of_a_check(&d, &stats, &server.url());
    assert_eq!(e.cause(), Some(FailureCause::Loading), "{e}");
    assert!(e.to_string().contains("loading its data set"), "{e}");
    // Once loaded, the same engine works.
    let start = Instant::now();
    while !d.check("k").is_new() {
        assert!(start.elapsed() < Duration::from_secs(10), "never loaded");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A shared-mode script — the read of committed results, when a claim
/// replays one — meets a key of the wrong type (the slice's results hash
/// replaced by a string).
#[test]
fn a_failing_script_is_a_script_error() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let (d, stats) = engine(&server.url(), Affinity::Shared);
    match d.claim("k") {
        Claim::Acquired(lease) => lease.commit(b"result").unwrap(),
        other => panic!("{other:?}"),
    }
    retype_keys(&mut admin, "td:*:b:*", &["SET", "{key}", "x"]);
    assert!(matches!(d.claim("k"), Claim::Unavailable), "fail closed");
    let e = stats.last_error().expect("a failure is remembered");
    assert_eq!(e.server(), Some(server.url().as_str()), "{e}");
    assert_eq!(e.cause(), Some(FailureCause::Script), "{e}");
}

/// The shared-mode log's epoch replaced by a key of another type: the
/// append (a transaction) meets data it did not write.
#[test]
fn an_epoch_of_the_wrong_type_is_an_unexpected_reply() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let (d, stats) = engine(&server.url(), Affinity::Shared);
    assert!(d.check("k").is_new());
    retype_keys(&mut admin, "td:*:log:epoch", &["HSET", "{key}", "f", "v"]);
    let e = failure_of_a_check(&d, &stats, &server.url());
    assert_eq!(e.cause(), Some(FailureCause::UnexpectedReply), "{e}");
    assert!(e.to_string().contains("WRONGTYPE"), "{e}");
}

/// A shared-mode log replaced by a key of another type: the tier meets
/// data it did not write.
#[test]
fn a_log_of_the_wrong_type_is_an_unexpected_reply() {
    let server = RedisServer::start();
    let mut admin = server.connection();
    let (d, stats) = engine(&server.url(), Affinity::Shared);
    assert!(d.check("k").is_new());
    // Replace the log (a stream) with a string.
    let logs = redis_server::mark_hashes(&mut admin);
    assert!(!logs.is_empty());
    for h in &logs {
        let _: () = redis::cmd("SET").arg(h).arg("x").query(&mut admin).unwrap();
    }
    let e = failure_of_a_check(&d, &stats, &server.url());
    assert_eq!(e.cause(), Some(FailureCause::UnexpectedReply), "{e}");
    assert!(e.to_string().contains("WRONGTYPE"), "{e}");
}

/// Replaces every key matching `pattern` (at least one) by the result of
/// `command` (`{key}` stands for the key): a key of another type than the
/// tier wrote.
fn retype_keys(admin: &mut redis::Connection, pattern: &str, command: &[&str]) {
    let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query(admin).unwrap();
    assert!(!keys.is_empty(), "no key matches {pattern}");
    for k in &keys {
        let _: () = redis::cmd("DEL").arg(k).query(admin).unwrap();
        let mut cmd = redis::cmd(command[0]);
        for a in &command[1..] {
            cmd.arg(if *a == "{key}" { k.as_str() } else { a });
        }
        let _: () = cmd.query(admin).unwrap();
    }
}
