//! A worker that applies one effect per key exactly once, under
//! transactional claims — the process `tests/crash.rs` kills with SIGKILL
//! at random moments and restarts. Also a runnable example of the pattern.
//!
//! ```text
//! td-pg-effects-worker <url> <keys> <batch> <seed>
//! ```
//!
//! It walks keys `0..keys` in a shuffled order, `batch` at a time, each
//! batch one transaction: claim them all ([`PgClaims::claim_batch`],
//! waiting for holders), insert one row into `effects` per acquired key,
//! store each result, commit. It exits 0 once a whole pass finds every key
//! completed. A failed transaction (server restart, lost connection) is
//! rolled back by the server and retried on a new connection.

use std::time::Duration;

use postgres::{Client, NoTls};
use tiered_dedup::ClaimRequest;
use tiered_dedup_postgres::{complete_batch, PgClaims, PgConfig, TxClaim, Wait};

fn connect(url: &str) -> Client {
    let mut pause = Duration::from_millis(10);
    loop {
        match Client::connect(url, NoTls) {
            Ok(c) => return c,
            Err(_) => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: td-pg-effects-worker <url> <keys> <batch> <seed>");
        std::process::exit(2);
    }
    let url = &args[1];
    let keys: u64 = args[2].parse().expect("keys");
    let batch: usize = args[3].parse().expect("batch");
    let mut seed: u64 = args[4].parse().expect("seed");
    let claims = loop {
        match PgClaims::builder(PgConfig::new(url))
            .window(Duration::from_secs(3_600))
            .wait(Wait::Block)
            .build()
        {
            Ok(c) => break c,
            Err(e) => {
                eprintln!("worker: {e}; retrying");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let mut client = connect(url);
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS effects (key bigint NOT NULL, applied_by int NOT NULL, at timestamptz NOT NULL DEFAULT now())",
        )
        .ok();
    let pid = std::process::id() as i32;
    let mut order: Vec<i64> = (0..keys as i64).collect();
    loop {
        // A new shuffle per pass (SplitMix64).
        for i in (1..order.len()).rev() {
            seed = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = seed;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            order.swap(i, (z % (i as u64 + 1)) as usize);
        }
        let mut all_done = true;
        for chunk in order.chunks(batch) {
            let outcome = (|| -> Result<bool, Box<dyn std::error::Error>> {
                let mut tx = client.transaction()?;
                let requests: Vec<ClaimRequest<u64>> =
                    chunk.iter().map(|&k| ClaimRequest::new(k as u64)).collect();
                let answers = claims.claim_batch(&mut tx, &requests)?;
                let mut done = true;
                let mut leases = Vec::new();
                for (&key, answer) in chunk.iter().zip(answers) {
                    match answer {
                        TxClaim::Acquired(lease) => {
                            done = false;
                            tx.execute(
                                "INSERT INTO effects (key, applied_by) VALUES ($1, $2)",
                                &[&key, &pid],
                            )?;
                            leases.push((lease, format!("applied {key} by {pid}").into_bytes()));
                        }
                        TxClaim::Completed { .. } => {}
                        TxClaim::InProgress { .. } | TxClaim::Conflict => done = false,
                    }
                }
                complete_batch(&mut tx, leases)?;
                tx.commit()?;
                Ok(done)
            })();
            match outcome {
                Ok(done) => all_done &= done,
                Err(e) => {
                    all_done = false;
                    eprintln!("worker {pid}: {e}; reconnecting");
                    if client.is_closed() {
                        client = connect(url);
                    }
                }
            }
        }
        if all_done {
            return;
        }
    }
}
