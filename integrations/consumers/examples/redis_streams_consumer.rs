//! A Redis Streams consumer-group member, effectively once: JSON messages
//! (field `data` of each entry) keyed by a field; the handler records its
//! effect (a PostgreSQL row in the claim's transaction, or a line in an
//! append-only file with claims in memory or Redis); `XACK` only after the
//! claim is committed; entries a dead member left pending are taken over
//! with `XAUTOCLAIM`.
//!
//! ```text
//! cargo run --release -p tiered-dedup-consumers --example redis_streams_consumer -- \
//!     --server redis://127.0.0.1:6379 --publish 10000
//! cargo run --release -p tiered-dedup-consumers --example redis_streams_consumer -- \
//!     --server redis://127.0.0.1:6379 --consumer c1 --effects effects.log --redis redis://127.0.0.1:6379 --idle-exit-ms 3000
//! ```

#[path = "support/app.rs"]
mod app;

use std::time::{Duration, Instant};

use app::{Args, Effects, Keyed};
use clap::Parser;
use tiered_dedup::consumer::Held;
use tiered_dedup_consumers::redis_streams::{RedisStreamConsumer, StreamEntry};
use tiered_dedup_consumers::Batching;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    args.check()?;
    let client = redis::Client::open(args.server.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    if let Some(n) = args.publish {
        let (messages, distinct) = app::workload(n, args.seed);
        for chunk in messages.chunks(1000) {
            let mut pipe = redis::pipe();
            for (id, _key, json) in chunk {
                pipe.cmd("XADD")
                    .arg(&args.stream)
                    .arg("*")
                    .arg("id")
                    .arg(id)
                    .arg("data")
                    .arg(json)
                    .ignore();
            }
            let () = pipe.query_async(&mut conn).await?;
        }
        println!("published {n} distinct {distinct}");
        return Ok(());
    }
    // The PostgreSQL client is synchronous: connect off the runtime's workers.
    let mut effects = tokio::task::block_in_place(|| Effects::open(&args))?;
    let batching = Batching {
        max: args.batch,
        wait: Duration::from_millis(200),
        ..Batching::default()
    };
    let mut source = RedisStreamConsumer::new(
        conn,
        &args.stream,
        &args.group,
        &args.consumer,
        batching,
        Duration::from_millis(args.ack_wait_ms),
    )
    .await?
    // A restarted broker: reconnect, and create the group again if lost.
    .reconnect_with(client);
    let mut bad = 0u64;
    // Pipelined: the last batch's messages, acked once their commits ride
    // with the next batch's claims (or are flushed by an empty read).
    let mut held = Held::new();
    let mut last = Instant::now();
    loop {
        let batch = match source.next_batch().await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("read failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                Vec::new()
            }
        };
        let idle = batch.is_empty();
        let mut rejected: Vec<StreamEntry> = Vec::new();
        let outcome = if idle {
            // Pipelined: the last batch's commits go now, then its acks.
            effects.flush(&mut held).await
        } else {
            last = Instant::now();
            let mut keyed = Vec::with_capacity(batch.len());
            for e in batch {
                let id = e
                    .field("id")
                    .map_or_else(|| e.id.clone(), |v| String::from_utf8_lossy(v).into_owned());
                match e
                    .field("data")
                    .ok_or_else(|| tiered_dedup_consumers::BadMessage("no field \"data\"".into()))
                    .and_then(|data| app::key_of(data, &args.key))
                {
                    Ok(key) => keyed.push(Keyed {
                        message: e,
                        key: String::from_utf8_lossy(&key).into_owned(),
                        id,
                    }),
                    Err(err) => {
                        bad += 1;
                        eprintln!("entry {}: {err}: acked without processing", e.id);
                        rejected.push(e);
                    }
                }
            }
            effects
                .run_batch(keyed, &mut held, &args.consumer, args.effect_delay_us)
                .await
        };
        // Nothing committed and nothing acked on a failure: reclaimed after
        // the idle time. A failed XACK (the broker went away) leaves the
        // entries pending too: reclaimed, answered `Completed`.
        let settled = outcome.unwrap_or_else(|e| {
            eprintln!("batch failed, left pending: {e}");
            Vec::new()
        });
        if let Err(e) = source
            .settle(settled.iter().map(|(k, d)| (&k.message, d)), &rejected)
            .await
        {
            eprintln!("ack failed, left pending: {e}");
        }
        if idle
            && args
                .idle_exit_ms
                .is_some_and(|ms| last.elapsed() >= Duration::from_millis(ms))
        {
            break;
        }
    }
    println!("{}", app::summary(effects.stats(), bad, source.acked()));
    tokio::task::block_in_place(move || drop(effects));
    Ok(())
}
