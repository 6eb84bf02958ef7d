//! A NATS JetStream consumer, effectively once: JSON messages keyed by a
//! field; the handler records its effect (a PostgreSQL row in the claim's
//! transaction, or a line in an append-only file with claims in memory or
//! Redis); acks only after the claim is committed.
//!
//! ```text
//! nats-server -js &
//! cargo run --release -p tiered-dedup-consumers --example jetstream_consumer -- \
//!     --server nats://127.0.0.1:4222 --publish 10000
//! cargo run --release -p tiered-dedup-consumers --example jetstream_consumer -- \
//!     --server nats://127.0.0.1:4222 --effects effects.log --redis redis://127.0.0.1:6379 --idle-exit-ms 3000
//! ```

#[path = "support/app.rs"]
mod app;

use std::time::{Duration, Instant};

use app::{Args, Effects, Keyed};
use async_nats::jetstream::{self, stream};
use clap::Parser;
use tiered_dedup::consumer::Held;
use tiered_dedup_consumers::jetstream::{consumer_config, JetStreamConsumer};
use tiered_dedup_consumers::Batching;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    args.check()?;
    let client = async_nats::connect(&args.server).await?;
    let js = jetstream::new(client.clone());
    let stream = js
        .get_or_create_stream(stream::Config {
            name: args.stream.clone(),
            subjects: vec![args.subject.clone()],
            duplicate_window: Duration::from_millis(args.dup_window_ms),
            ..Default::default()
        })
        .await?;
    if let Some(n) = args.publish {
        let (messages, distinct) = app::workload(n, args.seed);
        let mut acks = Vec::with_capacity(1000);
        for (id, _key, json) in messages {
            let ack = js
                .send_publish(
                    args.subject.clone(),
                    jetstream::message::PublishMessage::build()
                        .payload(json.into())
                        .message_id(id),
                )
                .await?;
            acks.push(ack);
            if acks.len() == 1000 {
                for a in acks.drain(..) {
                    a.await?;
                }
            }
        }
        for a in acks {
            a.await?;
        }
        println!("published {n} distinct {distinct}");
        return Ok(());
    }
    // The PostgreSQL client is synchronous: connect off the runtime's workers.
    let mut effects = tokio::task::block_in_place(|| Effects::open(&args))?;
    let config = consumer_config(&args.group, Duration::from_millis(args.ack_wait_ms));
    let consumer = stream
        .get_or_create_consumer(&args.group, config.clone())
        .await?;
    let batching = Batching {
        max: args.batch,
        wait: Duration::from_millis(200),
        ..Batching::default()
    };
    let mut source = JetStreamConsumer::new(&consumer, batching).await?;
    let mut bad = 0u64;
    // Pipelined: the last batch's messages, acked once their commits ride
    // with the next batch's claims (or are flushed by an empty pull).
    let mut held = Held::new();
    // Acks of pulls replaced after they ended.
    let mut acked_before = 0u64;
    let mut last = Instant::now();
    loop {
        let batch = match source.next_batch().await {
            Ok(b) => b,
            Err(e) => {
                eprintln!("pull failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                if source.has_ended() {
                    // The durable consumer was deleted (or the connection
                    // is gone): pull again from a (re)created one; what it
                    // redelivers is answered from the claims.
                    if let Ok(consumer) = stream
                        .get_or_create_consumer(&args.group, config.clone())
                        .await
                    {
                        if let Ok(fresh) = JetStreamConsumer::new(&consumer, batching).await {
                            acked_before += source.ack_stats().acked;
                            source = fresh;
                        }
                    }
                }
                Vec::new()
            }
        };
        let idle = batch.is_empty();
        let outcome = if idle {
            // Pipelined: the last batch's commits go now, then its acks.
            effects.flush(&mut held).await
        } else {
            last = Instant::now();
            let mut keyed = Vec::with_capacity(batch.len());
            for m in batch {
                let id = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                    .map(|v| v.as_str().to_owned())
                    .unwrap_or_default();
                match app::key_of(&m.payload, &args.key) {
                    Ok(key) => keyed.push(Keyed {
                        message: m,
                        key: String::from_utf8_lossy(&key).into_owned(),
                        id,
                    }),
                    Err(e) => {
                        bad += 1;
                        eprintln!("message {id}: {e}: terminated");
                        source.reject(&m).await?;
                    }
                }
            }
            effects
                .run_batch(keyed, &mut held, &args.consumer, args.effect_delay_us)
                .await
        };
        match outcome {
            // An ack that could not be sent: redelivered after AckWait,
            // answered `Completed`.
            Ok(settled) => {
                if let Err(e) = source
                    .settle(settled.into_iter().map(|(k, d)| (k.message, d)))
                    .await
                {
                    eprintln!("ack failed, left for redelivery: {e}");
                }
            }
            // Nothing committed and nothing acked: redelivered after AckWait.
            Err(e) => eprintln!("batch failed, left for redelivery: {e}"),
        }
        if idle
            && args
                .idle_exit_ms
                .is_some_and(|ms| last.elapsed() >= Duration::from_millis(ms))
        {
            break;
        }
    }
    client.flush().await?;
    println!(
        "{}",
        app::summary(
            effects.stats(),
            bad,
            acked_before + source.ack_stats().acked
        )
    );
    tokio::task::block_in_place(move || drop(effects));
    Ok(())
}
