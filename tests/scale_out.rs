//! Scale-out: K engine processes (this test binary re-invoked as children)
//! against a real three-master Redis Cluster on loopback, fed by a router
//! that keys partitions by the dedup key (owned mode) or sprays keys at
//! random (shared mode). During each run one instance is SIGKILLed and
//! restarted, a partition is handed over (owned mode) and a Cluster master
//! is restarted; afterwards every verdict of every instance is checked:
//! no key `New` twice within the window, no key wrongly a duplicate. The
//! larger driver is `benches/scale_out.rs`; the design is in
//! `docs/scale-out.md`.
//!
//! The masters keep an append-only file (`appendfsync always`), which a
//! restart must not lose. `TD_SIM_NO_AOF=1` starts them without: the
//! restarted master comes back empty and these tests fail with keys `New`
//! twice — the fault is real, and the checker sees it.
#![cfg(feature = "redis")]

#[path = "support/redis_cluster.rs"]
mod redis_cluster;
#[path = "support/redis_server.rs"]
mod redis_server;
#[path = "support/rng.rs"]
mod rng;
#[path = "support/scale_sim.rs"]
mod scale_sim;

use std::time::Duration;

use scale_sim::{check, ChildCommand, Mode, Record, SimConfig, Violation};

#[test]
fn smoke() {
    simulate(1, Mode::Owned, 2_000);
}

/// The child instances run this test, `TD_SIM_CHILD` set: the instance's
/// command loop. Run by the harness without it, it checks the global
/// checker on a hand-made history instead.
#[test]
fn scale_sim_child() {
    if std::env::var_os(scale_sim::CHILD_ENV).is_some() {
        scale_sim::child_main();
        return;
    }
    let w = Duration::from_nanos(100);
    let r = |key, t, duplicate_of| Record {
        key,
        t,
        instance: 0,
        duplicate_of,
    };
    assert!(check(&[r(1, 0, None), r(1, 50, Some(0)), r(1, 100, None)], &[], w).is_empty());
    assert!(matches!(
        check(&[r(1, 0, None), r(1, 99, None)], &[], w)[..],
        [Violation::NewTwice { .. }]
    ));
    assert!(matches!(
        check(&[r(1, 0, None), r(1, 100, Some(0))], &[], w)[..],
        [Violation::WrongDuplicate { .. }]
    ));
    assert!(matches!(
        check(&[r(1, 10, Some(5))], &[], w)[..],
        [Violation::WrongDuplicate { .. }]
    ));
    // A duplicate of what a killed instance was judging at that time is
    // right (it may have accepted the key without answering); of another
    // time, or of another key's hidden judgement, it is not.
    assert!(check(&[r(1, 10, Some(5))], &[(1, 5)], w).is_empty());
    assert!(matches!(
        check(&[r(1, 10, Some(5))], &[(1, 4), (2, 5)], w)[..],
        [Violation::WrongDuplicate { .. }]
    ));
}

fn child() -> ChildCommand {
    ChildCommand {
        exe: std::env::current_exe().unwrap(),
        args: [
            "--exact",
            "scale_sim_child",
            "--nocapture",
            "--test-threads",
            "1",
        ]
        .map(str::to_owned)
        .to_vec(),
    }
}

fn simulate(instances: usize, mode: Mode, keys: usize) {
    let mut cluster = scale_sim::start_cluster();
    let cfg = SimConfig::new(instances, mode, keys);
    let report = scale_sim::run(&cfg, &mut cluster, &child());
    let violations = check(&report.records, &report.hidden, cfg.window);
    eprintln!("{}", scale_sim::summary(&cfg, &report, &violations));
    for e in &report.events {
        eprintln!("  {e}");
    }
    assert!(
        violations.is_empty(),
        "{} violations, first: {:?}",
        violations.len(),
        &violations[..violations.len().min(5)]
    );
    assert!(report.records.len() >= keys, "every key judged");
}

#[test]
fn one_owned_instance_survives_kills_hand_overs_and_a_master_restart() {
    simulate(1, Mode::Owned, 20_000);
}

#[test]
fn two_owned_instances_survive_kills_hand_overs_and_a_master_restart() {
    simulate(2, Mode::Owned, 20_000);
}

#[test]
fn one_shared_instance_survives_a_kill_and_a_master_restart() {
    simulate(1, Mode::Shared, 20_000);
}

#[test]
fn two_shared_instances_survive_a_kill_and_a_master_restart() {
    simulate(2, Mode::Shared, 20_000);
}
