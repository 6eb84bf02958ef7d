//! The scale-out simulation at a larger scale: K = 1, 2, 4, 8 engine
//! processes (this binary re-invoked as children) against a private
//! three-master Redis Cluster on 127.0.0.1 (append-only file, fsync on
//! every write), owned mode (a router keying 16 partitions by the dedup
//! key) and shared mode (keys sprayed at random). Each run SIGKILLs an
//! instance and restarts it, hands a partition over (owned mode) and
//! restarts the master holding the most keys, then checks every verdict
//! of every instance globally (no key `New` twice within the window, no
//! key wrongly a duplicate). The support code is the test's
//! (`tests/support/scale_sim.rs`; `tests/scale_out.rs` runs it small in CI).
//!
//! Prints, per run, keys/s (judged checks over wall time, faults
//! included), CPU per key of the instances, the masters and the router,
//! the violations (must be 0; the bench exits non-zero otherwise) and the
//! events, then a Markdown table. On a 2-core machine every process shares
//! the same two cores: the figures show correctness and cost per key, not
//! scaling.
//!
//! `cargo bench --features redis --bench scale_out` (10⁶ keys per run);
//! `TD_SIM_KEYS=N`, `TD_SIM_INSTANCES=1,2`, `TD_SIM_MODES=owned|shared`,
//! `TD_SIM_BATCH=N` (router batch, default 32768: 2048 keys per partition
//! and command in owned mode) change the runs;
//! `TD_SIM_NO_AOF=1` runs the masters without persistence (violations
//! expected: a restarted master comes back empty); `-- --test` (as `cargo
//! bench -- --test` passes) runs K = 1 and 2 on 2·10⁴ keys.

#[path = "../tests/support/redis_cluster.rs"]
mod redis_cluster;
#[path = "../tests/support/redis_server.rs"]
mod redis_server;
#[path = "../tests/support/rng.rs"]
mod rng;
#[path = "../tests/support/scale_sim.rs"]
mod scale_sim;

use std::time::Duration;

use scale_sim::{check, ChildCommand, Mode, SimConfig};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

struct Row {
    instances: usize,
    mode: Mode,
    keys: usize,
    keys_per_sec: f64,
    instance_ns: Option<f64>,
    redis_ns: Option<f64>,
    violations: usize,
    wall: Duration,
}

fn main() {
    if std::env::var_os(scale_sim::CHILD_ENV).is_some() {
        scale_sim::child_main();
        return;
    }
    let smoke = std::env::args().any(|a| a == "--test");
    let keys = if smoke {
        20_000
    } else {
        env_or("TD_SIM_KEYS", 1_000_000)
    };
    let batch = env_or("TD_SIM_BATCH", 32_768);
    let instances: Vec<usize> = std::env::var("TD_SIM_INSTANCES")
        .unwrap_or_else(|_| if smoke { "1,2" } else { "1,2,4,8" }.to_owned())
        .split(',')
        .map(|k| k.trim().parse().expect("TD_SIM_INSTANCES: numbers"))
        .collect();
    let modes: Vec<Mode> = std::env::var("TD_SIM_MODES")
        .unwrap_or_else(|_| "owned,shared".to_owned())
        .split([',', '|'])
        .map(|m| Mode::parse(m.trim()).expect("TD_SIM_MODES: owned, shared"))
        .collect();
    let cmd = ChildCommand {
        exe: std::env::current_exe().expect("this executable"),
        args: Vec::new(),
    };
    let mut rows = Vec::new();
    for &mode in &modes {
        for &k in &instances {
            let mut cfg = SimConfig::with_batch(k, mode, keys, batch);
            cfg.partitions = 16;
            cfg.deadline = Duration::from_secs(1_800);
            let mut cluster = scale_sim::start_cluster();
            let report = scale_sim::run(&cfg, &mut cluster, &cmd);
            drop(cluster);
            let violations = check(&report.records, &report.hidden, cfg.window);
            println!("{}", scale_sim::summary(&cfg, &report, &violations));
            for e in &report.events {
                println!("  {e}");
            }
            for v in violations.iter().take(5) {
                println!("  violation: {v:?}");
            }
            rows.push(Row {
                instances: k,
                mode,
                keys,
                keys_per_sec: report.keys_per_sec(),
                instance_ns: report.ns_per_key(report.instance_cpu),
                redis_ns: report.ns_per_key(report.redis_cpu),
                violations: violations.len(),
                wall: report.wall,
            });
        }
    }
    let ns = |v: Option<f64>| v.map_or_else(|| "?".to_owned(), |ns| format!("{ns:.0}"));
    println!();
    println!(
        "| K | mode | keys | keys/s | instance CPU ns/key | Redis CPU ns/key | violations | wall |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {:.1} s |",
            r.instances,
            r.mode.name(),
            r.keys,
            r.keys_per_sec,
            ns(r.instance_ns),
            ns(r.redis_ns),
            r.violations,
            r.wall.as_secs_f64()
        );
    }
    let bad: usize = rows.iter().map(|r| r.violations).sum();
    if bad > 0 && scale_sim::persistent() {
        eprintln!("{bad} violations");
        std::process::exit(1);
    }
}
