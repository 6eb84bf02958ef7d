//! Exactly once under crashes: worker processes apply one effect per key
//! under transactional claims while this test SIGKILLs them at random
//! moments (at least 20 times) and restarts them, and restarts the server
//! itself (an immediate stop, as a crash) twice mid-stream. At the end
//! every key's effect exists exactly once, none missing, and every key's
//! record holds the result of the transaction that applied it.

#[path = "support/pg_server.rs"]
mod pg_server;
#[path = "../../../tests/support/rng.rs"]
mod rng;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pg_server::PgServer;
use rng::Rng;

const WORKER: &str = env!("CARGO_BIN_EXE_td-pg-effects-worker");

fn spawn(url: &str, keys: u64, seed: u64) -> Child {
    Command::new(WORKER)
        .args([url, &keys.to_string(), "16", &seed.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting the worker")
}

#[test]
fn every_effect_exactly_once_across_kills_and_server_restarts() {
    // fsync on: the server's crash recovery is the real one.
    let mut server = PgServer::start();
    let url = server.url();
    let keys = 40_000u64;
    let mut rng = Rng::new(0x0C4A_5400);
    let mut kills = 0;
    let mut restarts = 0;
    let started = Instant::now();
    for round in 0..30u64 {
        // Two workers at once, so that kills also land while one waits for
        // a key the other holds.
        let mut workers = vec![
            spawn(&url, keys, 2 * round + 1),
            spawn(&url, keys, 2 * round + 2),
        ];
        std::thread::sleep(Duration::from_millis(150 + rng.below(600)));
        if round == 10 || round == 20 {
            // The server crashes and comes back while the workers run.
            server.restart();
            restarts += 1;
            std::thread::sleep(Duration::from_millis(100 + rng.below(300)));
        }
        for w in &mut workers {
            if w.try_wait().unwrap().is_none() {
                w.kill().unwrap(); // SIGKILL
                kills += 1;
            }
            let _ = w.wait();
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "bounded in time"
        );
    }
    assert!(kills >= 20, "only {kills} kills landed while a worker ran");
    // A last pair runs to completion (bounded).
    let mut last = [spawn(&url, keys, 1_001), spawn(&url, keys, 1_002)];
    let deadline = Instant::now() + Duration::from_secs(300);
    for w in &mut last {
        loop {
            if let Some(status) = w.try_wait().unwrap() {
                assert!(status.success(), "the last worker failed: {status}");
                break;
            }
            if Instant::now() > deadline {
                let _ = w.kill();
                panic!("the last workers did not finish in time");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let mut c = server.client();
    let row = c
        .query_one(
            "SELECT count(*), count(DISTINCT key), min(key), max(key) FROM effects",
            &[],
        )
        .unwrap();
    let (n, distinct, min, max): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    assert_eq!(distinct, keys as i64, "every key's effect exists");
    assert_eq!(n, keys as i64, "no effect twice");
    assert_eq!((min, max), (0, keys as i64 - 1));
    // Each record carries the result its own transaction wrote: the effect
    // and the record committed together.
    let records: i64 = c
        .query_one(
            "SELECT count(*) FROM td_records WHERE result IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(records, keys as i64);
    let matched: i64 = c
        .query_one(
            "SELECT count(*) FROM effects e JOIN td_records r \
               ON convert_from(r.result, 'UTF8') = 'applied ' || e.key || ' by ' || e.applied_by",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        matched, keys as i64,
        "each record names the worker that applied its effect"
    );
    eprintln!(
        "{kills} kills, {restarts} server restarts, {keys} keys, {:?}",
        started.elapsed()
    );
}
