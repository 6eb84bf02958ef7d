//! Transactional claims against a private cluster: the claim and the
//! effect commit together or not at all; what a concurrent claimer sees
//! (no-wait and blocking); isolation; batches; claims racing from threads
//! apply each effect once; an engine with shared keys and transactional
//! claims see each other.

#[path = "support/pg_server.rs"]
mod pg_server;

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use pg_server::PgServer;
use postgres::{Client, IsolationLevel, NoTls};
use tiered_dedup::{Affinity, Claim, ClaimRequest, Deduper, ExactTier, PayloadFingerprint};
use tiered_dedup_postgres::{PgClaims, PgConfig, PgError, PgTier, TxClaim, Wait};

fn claims(server: &PgServer, wait: Wait) -> PgClaims {
    PgClaims::builder(PgConfig::new(&server.url()))
        .window(Duration::from_secs(600))
        .wait(wait)
        .build()
        .unwrap()
}

fn effects_table(c: &mut Client) {
    c.batch_execute("CREATE TABLE IF NOT EXISTS effects (key text NOT NULL, amount int NOT NULL)")
        .unwrap();
}

#[test]
fn smoke() {
    let server = PgServer::start();
    let claims = claims(&server, Wait::NoWait);
    let mut c = server.client();
    effects_table(&mut c);
    let mut tx = c.transaction().unwrap();
    let lease = claims
        .claim(&mut tx, "pay-1")
        .unwrap()
        .into_lease()
        .unwrap();
    tx.execute("INSERT INTO effects VALUES ('pay-1', 42)", &[])
        .unwrap();
    lease.complete(&mut tx, b"receipt-1").unwrap();
    tx.commit().unwrap();
    let mut tx = c.transaction().unwrap();
    match claims.claim(&mut tx, "pay-1").unwrap() {
        TxClaim::Completed { result, .. } => assert_eq!(&result[..], b"receipt-1"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_rollback_undoes_the_claim_with_the_effect() {
    let server = PgServer::start();
    let claims = claims(&server, Wait::NoWait);
    let mut c = server.client();
    effects_table(&mut c);
    let mut tx = c.transaction().unwrap();
    assert!(claims.claim(&mut tx, "k").unwrap().is_acquired());
    tx.execute("INSERT INTO effects VALUES ('k', 1)", &[])
        .unwrap();
    tx.rollback().unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM effects", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    let mut tx = c.transaction().unwrap();
    assert!(
        claims.claim(&mut tx, "k").unwrap().is_acquired(),
        "as if never claimed"
    );
}

/// No-wait: a second claimer sees `InProgress` while the first
/// transaction is open, then `Completed` once it commits.
#[test]
fn no_wait_answers_in_progress_while_the_holder_is_open() {
    let server = PgServer::start();
    let claims = claims(&server, Wait::NoWait);
    let (mut a, mut b) = (server.client(), server.client());
    let mut ta = a.transaction().unwrap();
    let lease = claims.claim(&mut ta, "k").unwrap().into_lease().unwrap();
    let mut tb = b.transaction().unwrap();
    assert_eq!(
        format!("{:?}", claims.claim(&mut tb, "k").unwrap()),
        "InProgress { until: None }"
    );
    tb.rollback().unwrap();
    lease.complete(&mut ta, b"r").unwrap();
    ta.commit().unwrap();
    let mut tb = b.transaction().unwrap();
    assert!(claims.claim(&mut tb, "k").unwrap().is_completed());
}

/// Blocking: a second claimer waits for the holder, then sees what it
/// left: `Completed` after a commit, `Acquired` after a rollback.
#[test]
fn block_waits_for_the_holder_and_sees_its_outcome() {
    let server = PgServer::start();
    let claims = Arc::new(claims(&server, Wait::Block));
    for commit in [true, false] {
        let key = format!("k-{commit}");
        let mut a = server.client();
        let mut ta = a.transaction().unwrap();
        let lease = claims
            .claim(&mut ta, key.as_str())
            .unwrap()
            .into_lease()
            .unwrap();
        let waiter = {
            let claims = Arc::clone(&claims);
            let mut b = server.client();
            let key = key.clone();
            std::thread::spawn(move || {
                let mut tb = b.transaction().unwrap();
                let started = Instant::now();
                let answer = claims.claim(&mut tb, key.as_str()).unwrap();
                let kind = format!("{answer:?}");
                tb.commit().unwrap();
                (kind, started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        if commit {
            lease.complete(&mut ta, b"done").unwrap();
            ta.commit().unwrap();
        } else {
            ta.rollback().unwrap();
        }
        let (kind, waited) = waiter.join().unwrap();
        assert!(
            waited >= Duration::from_millis(100),
            "it waited: {waited:?}"
        );
        if commit {
            assert!(kind.starts_with("Completed"), "{kind}");
        } else {
            assert!(kind.starts_with("Acquired"), "{kind}");
        }
    }
}

#[test]
fn only_read_committed_is_accepted() {
    let server = PgServer::start();
    let claims = claims(&server, Wait::NoWait);
    let mut c = server.client();
    for level in [IsolationLevel::RepeatableRead, IsolationLevel::Serializable] {
        let mut tx = c
            .build_transaction()
            .isolation_level(level)
            .start()
            .unwrap();
        let e = claims.claim(&mut tx, "k").unwrap_err();
        assert!(matches!(e, PgError::Isolation(_)), "{e}");
        assert!(e.to_string().contains("READ COMMITTED"), "{e}");
    }
    let mut tx = c
        .build_transaction()
        .isolation_level(IsolationLevel::ReadCommitted)
        .start()
        .unwrap();
    assert!(claims.claim(&mut tx, "k").unwrap().is_acquired());
}

#[test]
fn a_batch_claims_in_three_statements_and_sees_its_own_copies() {
    let server = PgServer::start();
    let claims = claims(&server, Wait::NoWait);
    let mut c = server.client();
    let a = PayloadFingerprint::of(b"a");
    let b = PayloadFingerprint::of(b"b");
    let mut tx = c.transaction().unwrap();
    let first = claims
        .claim_batch(
            &mut tx,
            &[
                ClaimRequest::new("x").payload(a),
                ClaimRequest::new("y"),
                ClaimRequest::new("x").payload(a),
                ClaimRequest::new("x").payload(b),
            ],
        )
        .unwrap();
    assert!(first[0].is_acquired() && first[1].is_acquired());
    assert!(first[2].is_completed(), "{:?}", first[2]);
    assert!(first[3].is_conflict(), "{:?}", first[3]);
    let leases: Vec<_> = first
        .into_iter()
        .filter_map(TxClaim::into_lease)
        .map(|l| (l, b"r".to_vec()))
        .collect();
    tiered_dedup_postgres::complete_batch(&mut tx, leases).unwrap();
    tx.commit().unwrap();
    let mut tx = c.transaction().unwrap();
    let again = claims
        .claim_batch(
            &mut tx,
            &[ClaimRequest::new("x").payload(b), ClaimRequest::new("y")],
        )
        .unwrap();
    assert!(again[0].is_conflict());
    assert!(matches!(&again[1], TxClaim::Completed { result, .. } if &result[..] == b"r"));
}

/// Threads race on the same keys, each claim-effect-commit in its own
/// transaction (blocking and no-wait): every key's effect exactly once.
#[test]
fn racing_transactions_apply_each_effect_once() {
    let server = PgServer::start_with(&["fsync=off"]);
    for wait in [Wait::Block, Wait::NoWait] {
        let claims = Arc::new(
            PgClaims::builder(PgConfig::new(&server.url()).prefix(if wait == Wait::Block {
                "blk"
            } else {
                "nowait"
            }))
            .wait(wait)
            .build()
            .unwrap(),
        );
        let table = format!("effects_{wait:?}").to_lowercase();
        server
            .client()
            .batch_execute(&format!("CREATE TABLE {table} (key bigint NOT NULL)"))
            .unwrap();
        let threads = 6;
        let keys = 300u64;
        let barrier = Arc::new(Barrier::new(threads));
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (claims, barrier, url, table) = (
                    Arc::clone(&claims),
                    Arc::clone(&barrier),
                    server.url(),
                    table.clone(),
                );
                std::thread::spawn(move || {
                    let mut c = Client::connect(&url, NoTls).unwrap();
                    barrier.wait();
                    let mut applied = 0;
                    let deadline = Instant::now() + Duration::from_secs(120);
                    let mut pending: Vec<u64> = (0..keys).collect();
                    while !pending.is_empty() && Instant::now() < deadline {
                        let mut still = Vec::new();
                        // Each thread walks the keys from its own offset.
                        for i in 0..pending.len() {
                            let k = pending[(i + t * 37) % pending.len()];
                            let mut tx = c.transaction().unwrap();
                            match claims.claim(&mut tx, &k).unwrap() {
                                TxClaim::Acquired(lease) => {
                                    tx.execute(
                                        &format!("INSERT INTO {table} VALUES ($1)"),
                                        &[&(k as i64)],
                                    )
                                    .unwrap();
                                    lease.complete(&mut tx, b"ok").unwrap();
                                    tx.commit().unwrap();
                                    applied += 1;
                                }
                                TxClaim::Completed { .. } => {}
                                TxClaim::InProgress { .. } => still.push(k),
                                TxClaim::Conflict => unreachable!(),
                            }
                        }
                        still.sort_unstable();
                        still.dedup();
                        pending = still;
                    }
                    applied
                })
            })
            .collect();
        let applied: u64 = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let row = server
            .client()
            .query_one(
                &format!("SELECT count(*), count(DISTINCT key) FROM {table}"),
                &[],
            )
            .unwrap();
        let (n, distinct): (i64, i64) = (row.get(0), row.get(1));
        assert_eq!((n, distinct), (keys as i64, keys as i64), "{wait:?}");
        assert_eq!(applied, keys, "{wait:?}");
    }
}

/// An engine with shared keys and transactional claims on the same
/// tables: each sees the other's holders and records.
#[test]
fn engine_leases_and_transactional_claims_see_each_other() {
    let server = PgServer::start();
    let tier = PgTier::connect(PgConfig::new(&server.url())).unwrap();
    let dedup = Deduper::builder()
        .window(Duration::from_secs(600))
        .affinity(Affinity::Shared)
        .exact_tier(ExactTier::Custom(Arc::new(tier)))
        .build()
        .unwrap();
    let claims = claims(&server, Wait::NoWait);
    let mut c = server.client();
    // An engine lease: the transactional claim is in progress.
    let lease = dedup.claim("e").into_lease().unwrap();
    let mut tx = c.transaction().unwrap();
    assert!(matches!(
        claims.claim(&mut tx, "e").unwrap(),
        TxClaim::InProgress { until: Some(_) }
    ));
    tx.rollback().unwrap();
    lease.commit(b"by the engine").unwrap();
    let mut tx = c.transaction().unwrap();
    assert!(
        matches!(claims.claim(&mut tx, "e").unwrap(), TxClaim::Completed { result, .. } if &result[..] == b"by the engine")
    );
    tx.rollback().unwrap();
    // A transaction open on a key: the engine's claim is in progress, then
    // completed with the transaction's result.
    let mut tx = c.transaction().unwrap();
    let held = claims.claim(&mut tx, "t").unwrap().into_lease().unwrap();
    assert!(dedup.claim("t").is_in_progress());
    assert!(dedup.check("t").is_in_progress());
    held.complete(&mut tx, b"by the transaction").unwrap();
    tx.commit().unwrap();
    match dedup.claim("t") {
        Claim::Completed { result, .. } => assert_eq!(&result[..], b"by the transaction"),
        other => panic!("{other:?}"),
    }
    assert!(dedup.check("t").is_duplicate());
}

/// A transaction that claimed a key holds its lock until it ends, even when
/// the answer was `InProgress`: an engine's commit of that key meets the
/// held lock, waits for it (every lock, in order) and then applies.
#[test]
fn an_engine_commit_waits_for_a_transaction_holding_the_key() {
    let server = PgServer::start();
    let tier = PgTier::connect(PgConfig::new(&server.url())).unwrap();
    let dedup = Arc::new(
        Deduper::builder()
            .window(Duration::from_secs(600))
            .affinity(Affinity::Shared)
            .exact_tier(ExactTier::Custom(Arc::new(tier)))
            .build()
            .unwrap(),
    );
    let claims = claims(&server, Wait::NoWait);
    let lease = dedup
        .claim_owned(ClaimRequest::new("w"))
        .into_lease()
        .unwrap();
    let mut c = server.client();
    let mut tx = c.transaction().unwrap();
    assert!(claims.claim(&mut tx, "w").unwrap().is_in_progress());
    let committer = std::thread::spawn(move || {
        let started = Instant::now();
        let result = lease.commit(b"after the wait").is_ok();
        (result, started.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    tx.rollback().unwrap();
    let (committed, waited) = committer.join().unwrap();
    assert!(committed, "the commit applied once the lock was free");
    assert!(
        waited >= Duration::from_millis(200),
        "it waited: {waited:?}"
    );
    match dedup.claim("w") {
        Claim::Completed { result, .. } => assert_eq!(&result[..], b"after the wait"),
        other => panic!("{other:?}"),
    };
}
