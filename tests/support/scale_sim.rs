//! A multi-process scale-out simulation: K engine processes (this binary
//! re-invoked as children) against a real Redis Cluster on loopback, fed by
//! a router in the parent. Owned mode: keys are split into partitions by
//! the dedup key (as a broker keyed by it would), each partition owned by
//! one instance with its own namespace. Shared mode: keys are sprayed at
//! random over the instances, which share one namespace.
//!
//! During the run the router SIGKILLs one instance between batches and one
//! while it judges a batch, and restarts each (cold
//! filter), hands a partition over from one instance to another (owned
//! mode; cold filter on the new owner), and restarts one Cluster master
//! (with its append-only file, so nothing acknowledged is lost). Every
//! verdict of every instance is kept; [`check`] then verifies globally that
//! within the window no key is `New` twice and that no key is ever a
//! duplicate of an acceptance that did not happen inside its window.
//!
//! Protocol (lines; a child's answer follows the marker [`REPLY`], as the
//! test harness prints on the same stdout, and with one test thread it
//! writes `test scale_sim_child ... ` without a newline before the test
//! runs, so the marker need not start the line):
//! `O <p>` own partition `p` → `ok`; `R <p>` release it (flush, drop) →
//! `ok`; `C <p> <t_ns> <key>…` check keys at time `t` → a
//! token per key: `N` new, `D<first_seen_ns>` duplicate, `U` not judged
//! (Redis unavailable, in progress, likely duplicate: the router resends
//! it later). A child acknowledges a `C` only once its marks are stored
//! (it flushes, retrying while the Cluster heals), as a consumer commits
//! its offsets only after that.
#![allow(dead_code)] // the test and the bench use different parts

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tiered_dedup::exact::redis::{RedisConfig, RedisTier};
use tiered_dedup::{Affinity, Clock, Deduper, ExactTier, ManualClock, Timestamp, Verdict};

use super::redis_cluster::RedisCluster;
use super::rng::Rng;

/// Set in a child's environment: the child runs [`child_main`].
pub const CHILD_ENV: &str = "TD_SIM_CHILD";

/// What precedes a child's answer on its stdout.
const REPLY: &str = "@@td@";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Owned,
    Shared,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Owned => "owned",
            Mode::Shared => "shared",
        }
    }

    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "owned" => Some(Mode::Owned),
            "shared" => Some(Mode::Shared),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    pub instances: usize,
    pub mode: Mode,
    /// Checks in all (resends of unjudged keys not counted).
    pub keys: usize,
    /// Distinct keys drawn from (uniformly): repeats come from the pool.
    pub pool: u64,
    /// Partitions (owned mode; shared mode uses one namespace).
    pub partitions: usize,
    /// Keys per router batch.
    pub batch: usize,
    /// Simulated time between batches.
    pub step: Duration,
    /// The dedup window (simulated time).
    pub window: Duration,
    /// Kill and restart an instance, hand a partition over, restart a
    /// Cluster master.
    pub faults: bool,
    /// Bound on the whole run (wall time).
    pub deadline: Duration,
    pub seed: u64,
}

impl SimConfig {
    /// `keys` checks in router batches of 512, 8 partitions, faults on.
    pub fn new(instances: usize, mode: Mode, keys: usize) -> Self {
        Self::with_batch(instances, mode, keys, 512)
    }

    /// The same with router batches of `batch` keys (the window stays a
    /// third of the run).
    pub fn with_batch(instances: usize, mode: Mode, keys: usize, batch: usize) -> Self {
        let batches = keys.div_ceil(batch).max(1) as u32;
        let step = Duration::from_millis(10);
        SimConfig {
            instances,
            mode,
            keys,
            pool: (keys as u64 / 3).max(1),
            partitions: 8,
            batch,
            step,
            // A third of the run: keys repeat inside and after it.
            window: (step * batches / 3).max(Duration::from_millis(100)),
            faults: true,
            deadline: Duration::from_secs(120),
            seed: 0x5ca1e,
        }
    }
}

/// One verdict an instance gave.
#[derive(Clone, Copy, Debug)]
pub struct Record {
    pub key: u64,
    pub t: u64,
    pub instance: usize,
    /// `None`: new; `Some(first_seen)`: duplicate.
    pub duplicate_of: Option<u64>,
}

#[derive(Debug, Default)]
pub struct SimReport {
    pub records: Vec<Record>,
    /// Keys (and their batch's time) sent to an instance that was killed
    /// before it answered: it may have accepted them without saying so.
    pub hidden: Vec<(u64, u64)>,
    pub unjudged: u64,
    pub wall: Duration,
    /// Wall time spent in the faults themselves (killing, restarting,
    /// handing over), inside `wall`.
    pub fault_wall: Duration,
    /// The batch that took longest (its number, its wall time): the
    /// stall a fault causes.
    pub slowest_batch: (usize, Duration),
    pub events: Vec<String>,
    /// CPU time (user + system) of every instance process, the killed one
    /// included (read just before the kill); `None` off Linux.
    pub instance_cpu: Option<Duration>,
    /// CPU time of every Cluster master, the restarted one's first life
    /// included.
    pub redis_cpu: Option<Duration>,
    /// CPU time of the router (this process) over the run.
    pub router_cpu: Option<Duration>,
}

impl SimReport {
    /// Judged checks per second of wall time (faults included).
    pub fn keys_per_sec(&self) -> f64 {
        self.records.len() as f64 / self.wall.as_secs_f64()
    }

    /// CPU nanoseconds per judged check.
    pub fn ns_per_key(&self, cpu: Option<Duration>) -> Option<f64> {
        Some(cpu?.as_nanos() as f64 / self.records.len().max(1) as f64)
    }
}

/// CPU time (user + system) a process has used, from `/proc/<pid>/stat`
/// (`"self"` for this one).
#[cfg(target_os = "linux")]
pub fn cpu_time(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): utime and
    // stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Some(Duration::from_secs_f64(ticks as f64 / hz.max(1) as f64))
}

#[cfg(not(target_os = "linux"))]
pub fn cpu_time(_: &str) -> Option<Duration> {
    None
}

/// Adds `more` to a CPU total that stays `None` once a reading failed.
fn add_cpu(total: &mut Option<Duration>, more: Option<Duration>) {
    *total = total.zip(more).map(|(a, b)| a + b);
}

/// A violation of exactness found by [`check`].
#[derive(Debug)]
pub enum Violation {
    NewTwice {
        key: u64,
        first: (u64, usize),
        second: (u64, usize),
    },
    WrongDuplicate {
        key: u64,
        t: u64,
        instance: usize,
        first_seen: u64,
    },
}

/// The global check over every verdict of every instance. `hidden` holds
/// the (key, time) pairs an instance was judging when it was killed: it may
/// have accepted them (its mark or claim reached Redis) without answering,
/// so a later duplicate that names that time as the first sighting is
/// right; any other duplicate must name a delivered `New`.
pub fn check(records: &[Record], hidden: &[(u64, u64)], window: Duration) -> Vec<Violation> {
    let hidden: std::collections::HashSet<(u64, u64)> = hidden.iter().copied().collect();
    let w = window.as_nanos() as u64;
    let mut by_key: HashMap<u64, Vec<&Record>> = HashMap::new();
    for r in records {
        by_key.entry(r.key).or_default().push(r);
    }
    let mut out = Vec::new();
    for (key, mut rs) in by_key {
        rs.sort_by_key(|r| (r.t, r.duplicate_of.is_some()));
        let news: Vec<&Record> = rs
            .iter()
            .copied()
            .filter(|r| r.duplicate_of.is_none())
            .collect();
        for pair in news.windows(2) {
            if pair[1].t.saturating_sub(pair[0].t) < w {
                out.push(Violation::NewTwice {
                    key,
                    first: (pair[0].t, pair[0].instance),
                    second: (pair[1].t, pair[1].instance),
                });
            }
        }
        for r in rs.iter().filter(|r| r.duplicate_of.is_some()) {
            let first_seen = r.duplicate_of.unwrap();
            let real =
                news.iter().any(|n| n.t == first_seen) || hidden.contains(&(key, first_seen));
            if !real || r.t.saturating_sub(first_seen) >= w {
                out.push(Violation::WrongDuplicate {
                    key,
                    t: r.t,
                    instance: r.instance,
                    first_seen,
                });
            }
        }
    }
    out
}

// ---------------------------------------------------------------- child

fn deduper(
    seeds: &[String],
    mode: Mode,
    partition: usize,
    window: Duration,
    keys: usize,
) -> (Deduper, ManualClock) {
    let clock = ManualClock::new(Timestamp::from_secs(1));
    let seeds: Vec<&str> = seeds.iter().map(String::as_str).collect();
    let mut config = RedisConfig::cluster(&seeds);
    config.prefix = match mode {
        Mode::Owned => format!("td-sim-p{partition}"),
        Mode::Shared => "td-sim".to_owned(),
    };
    config.timeout = Duration::from_millis(300);
    let d = Deduper::builder()
        .window(window)
        .expected_keys(keys.max(1_000) as u64)
        .shards(2)
        // Marks go out in batches: the instance flushes after every
        // command anyway (1, the default, would cost a round trip per
        // accepted key in owned mode).
        .mark_batch(4_096)
        .affinity(match mode {
            Mode::Owned => Affinity::Owned,
            Mode::Shared => Affinity::Shared,
        })
        .clock(Clock::Manual(clock.clone()))
        .exact_tier(ExactTier::Custom(Arc::new(RedisTier::new(config))))
        .build()
        .expect("building a simulated instance");
    (d, clock)
}

/// Flushes until every mark is stored (the Cluster may be healing), at
/// most 20 s.
fn flush_stored(d: &Deduper) {
    let start = Instant::now();
    while let Err(e) = d.flush() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "marks not stored after 20 s: {e}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The child's loop: reads commands on stdin until it closes. Settings
/// come from the environment the router set.
pub fn child_main() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} unset"));
    let seeds: Vec<String> = var("TD_SIM_SEEDS").split(',').map(str::to_owned).collect();
    let mode = Mode::parse(&var("TD_SIM_MODE")).expect("TD_SIM_MODE");
    let window = Duration::from_nanos(var("TD_SIM_WINDOW_NS").parse().unwrap());
    let keys: usize = var("TD_SIM_EXPECTED").parse().unwrap();
    let mut owned: HashMap<usize, (Deduper, ManualClock)> = HashMap::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut line = String::new();
    let mut reply = String::new();
    let mut stdin = stdin.lock();
    loop {
        line.clear();
        if stdin.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let mut words = line.split_ascii_whitespace();
        let cmd = words.next().unwrap_or("");
        let p: usize = words.next().map_or(0, |w| w.parse().unwrap());
        reply.clear();
        reply.push_str(REPLY);
        match cmd {
            "O" => {
                owned.insert(p, deduper(&seeds, mode, p, window, keys));
                reply.push_str("ok");
            }
            "R" => {
                if let Some((d, _)) = owned.remove(&p) {
                    flush_stored(&d);
                }
                reply.push_str("ok");
            }
            "C" => {
                let t: u64 = words.next().unwrap().parse().unwrap();
                let batch: Vec<u64> = words.map(|w| w.parse().unwrap()).collect();
                let (d, clock) = owned.get(&p).expect("a check for a partition not owned");
                clock.set(Timestamp::from_nanos(t));
                let verdicts = d.check_batch(&batch);
                flush_stored(d);
                for v in verdicts {
                    match v {
                        Verdict::New => reply.push_str(" N"),
                        Verdict::Duplicate { first_seen } => {
                            reply.push_str(&format!(" D{}", first_seen.as_nanos()));
                        }
                        _ => reply.push_str(" U"),
                    }
                }
            }
            other => panic!("unknown command {other:?}"),
        }
        reply.push('\n');
        out.write_all(reply.as_bytes()).unwrap();
        out.flush().unwrap();
    }
}

// ---------------------------------------------------------------- router

struct Instance {
    child: Child,
    stdin: ChildStdin,
    /// The child's answers, read off its stdout by a thread of their own
    /// (so that waiting for one is bounded in time); closed when it exits.
    answers: Receiver<String>,
}

/// How long an instance may take to answer one command.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Forwards the answers among `stdout`'s lines until it closes.
fn read_answers(stdout: ChildStdout, answers: Sender<String>) {
    let mut stdout = BufReader::new(stdout);
    let mut line = String::new();
    loop {
        line.clear();
        match stdout.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if let Some(at) = line.find(REPLY) {
            let answer = line[at + REPLY.len()..].trim_end().to_owned();
            if answers.send(answer).is_err() {
                return;
            }
        }
    }
}

/// How to start a child: this executable with these arguments.
#[derive(Clone)]
pub struct ChildCommand {
    pub exe: std::path::PathBuf,
    pub args: Vec<String>,
}

struct Router<'a> {
    cfg: &'a SimConfig,
    cmd: &'a ChildCommand,
    seeds: Vec<String>,
    instances: Vec<Instance>,
    /// Partition → owner.
    owner: Vec<usize>,
    /// Each Cluster master's CPU time when the run started (zero for a
    /// master restarted since: its new process).
    redis_base: Vec<Option<Duration>>,
}

impl Router<'_> {
    fn spawn(&self) -> Instance {
        let mut child = Command::new(&self.cmd.exe)
            .args(&self.cmd.args)
            .env(CHILD_ENV, "1")
            .env("TD_SIM_SEEDS", self.seeds.join(","))
            .env("TD_SIM_MODE", self.cfg.mode.name())
            .env(
                "TD_SIM_WINDOW_NS",
                (self.cfg.window.as_nanos() as u64).to_string(),
            )
            .env("TD_SIM_EXPECTED", self.expected_keys().to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting a simulated instance");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, answers) = mpsc::channel();
        std::thread::spawn(move || read_answers(stdout, tx));
        Instance {
            child,
            stdin,
            answers,
        }
    }

    /// Keys per window one namespace expects: owned, a partition's share.
    fn expected_keys(&self) -> usize {
        let pool = self.cfg.pool as usize;
        match self.cfg.mode {
            Mode::Owned => pool / self.cfg.partitions,
            Mode::Shared => pool,
        }
    }

    fn send(&mut self, i: usize, line: &str) {
        self.instances[i]
            .stdin
            .write_all(line.as_bytes())
            .expect("writing to an instance");
    }

    fn answer(&mut self, i: usize) -> String {
        match self.instances[i].answers.recv_timeout(ANSWER_TIMEOUT) {
            Ok(answer) => answer,
            Err(RecvTimeoutError::Timeout) => {
                panic!("instance {i} did not answer within {ANSWER_TIMEOUT:?}")
            }
            Err(RecvTimeoutError::Disconnected) => panic!("instance {i} exited"),
        }
    }

    fn own(&mut self, i: usize, p: usize) {
        self.send(i, &format!("O {p}\n"));
        assert_eq!(self.answer(i), "ok");
    }

    fn partitions(&self) -> usize {
        match self.cfg.mode {
            Mode::Owned => self.cfg.partitions,
            Mode::Shared => self.cfg.instances,
        }
    }

    /// Each instance's namespaces: owned, its partitions; shared, the one
    /// namespace (under "partition" `i`, its own).
    fn start_owning(&mut self, i: usize) {
        for p in 0..self.partitions() {
            if self.owner[p] == i {
                match self.cfg.mode {
                    Mode::Owned => self.own(i, p),
                    Mode::Shared => self.own(i, 0),
                }
            }
        }
    }
}

fn partition_of(key: u64, partitions: usize) -> usize {
    // A broker's key hash: any function of the key alone.
    (key.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40) as usize % partitions
}

/// Runs the simulation against `cluster` (started with persistence, see
/// [`start_cluster`]).
pub fn run(cfg: &SimConfig, cluster: &mut RedisCluster, cmd: &ChildCommand) -> SimReport {
    let started = Instant::now();
    let mut router = Router {
        cfg,
        cmd,
        seeds: cluster.urls(),
        instances: Vec::new(),
        owner: Vec::new(),
        redis_base: cluster
            .nodes
            .iter()
            .map(|n| cpu_time(&n.pid().to_string()))
            .collect(),
    };
    router.owner = (0..router.partitions())
        .map(|p| p % cfg.instances)
        .collect();
    for i in 0..cfg.instances {
        let inst = router.spawn();
        router.instances.push(inst);
        router.start_owning(i);
    }
    let mut report = SimReport {
        instance_cpu: Some(Duration::ZERO),
        redis_cpu: Some(Duration::ZERO),
        ..SimReport::default()
    };
    let router_cpu = cpu_time("self");
    let mut rng = Rng::new(cfg.seed);
    let batches = cfg.keys.div_ceil(cfg.batch);
    let step = cfg.step.as_nanos() as u64;
    let t0 = 1_000_000_000u64;
    // Keys not judged (Redis unavailable): sent again with the next batch.
    let mut retry: Vec<u64> = Vec::new();
    let mut sent = 0usize;
    let mut b = 0usize;
    while sent < cfg.keys || !retry.is_empty() {
        assert!(
            started.elapsed() < cfg.deadline,
            "the simulation ran past its deadline ({:?}); {} keys unjudged",
            cfg.deadline,
            retry.len()
        );
        assert!(b < batches * 4 + 1_000, "keys are never judged: {retry:?}");
        let t = t0 + b as u64 * step;
        if cfg.faults {
            let t = Instant::now();
            fault(&mut router, cluster, b, batches, &mut report);
            report.fault_wall += t.elapsed();
        }
        let batch_started = Instant::now();
        let fresh = cfg.batch.min(cfg.keys - sent);
        sent += fresh;
        let mut keys: Vec<u64> = std::mem::take(&mut retry);
        keys.extend((0..fresh).map(|_| rng.below(cfg.pool)));
        // Route: by partition (owned) or at random (shared).
        let n = router.instances.len();
        let mut per: Vec<Vec<u64>> = vec![Vec::new(); router.partitions()];
        for &k in &keys {
            let slot = match cfg.mode {
                Mode::Owned => partition_of(k, cfg.partitions),
                Mode::Shared => rng.below(n as u64) as usize,
            };
            per[slot].push(k);
        }
        // Send everything, then read: the instances work in parallel.
        let mut asked: Vec<(usize, Vec<u64>)> = Vec::new();
        for (slot, ks) in per.into_iter().enumerate() {
            if ks.is_empty() {
                continue;
            }
            let (inst, p) = match cfg.mode {
                Mode::Owned => (router.owner[slot], slot),
                Mode::Shared => (slot, 0),
            };
            let mut line = format!("C {p} {t}");
            for k in &ks {
                line.push_str(&format!(" {k}"));
            }
            line.push('\n');
            router.send(inst, &line);
            asked.push((inst, ks));
        }
        // A kill while a batch is in flight: the victim may have written
        // some of its marks or claims and answered none.
        let killed = if cfg.faults && b == 3 * batches / 8 && !asked.is_empty() {
            let victim = asked[0].0;
            // Within the first 2 ms of a batch that takes longer to judge
            // and store (512 keys in CI, 32 768 in the driver).
            std::thread::sleep(Duration::from_micros(rng.below(2_000)));
            let pid = router.instances[victim].child.id().to_string();
            add_cpu(&mut report.instance_cpu, cpu_time(&pid));
            router.instances[victim].child.kill().unwrap();
            let _ = router.instances[victim].child.wait();
            let answered = router.instances[victim].answers.try_recv().is_ok();
            let fresh = router.spawn();
            router.instances[victim] = fresh;
            router.start_owning(victim);
            report.events.push(format!(
                "batch {b}: instance {victim} SIGKILLed while judging its batch ({}), restarted",
                if answered {
                    "it had answered already"
                } else {
                    "before its answer"
                }
            ));
            Some(victim)
        } else {
            None
        };
        for (inst, ks) in asked {
            if killed == Some(inst) {
                report.unjudged += ks.len() as u64;
                report.hidden.extend(ks.iter().map(|&k| (k, t)));
                retry.extend(ks);
                continue;
            }
            let answer = router.answer(inst);
            let tokens: Vec<&str> = answer.split_ascii_whitespace().collect();
            assert_eq!(tokens.len(), ks.len(), "instance {inst}: {answer}");
            for (&k, tok) in ks.iter().zip(tokens) {
                let duplicate_of = match tok.as_bytes()[0] {
                    b'N' => None,
                    b'D' => Some(tok[1..].parse().unwrap()),
                    _ => {
                        report.unjudged += 1;
                        retry.push(k);
                        continue;
                    }
                };
                report.records.push(Record {
                    key: k,
                    t,
                    instance: inst,
                    duplicate_of,
                });
            }
        }
        if batch_started.elapsed() > report.slowest_batch.1 {
            report.slowest_batch = (b, batch_started.elapsed());
        }
        b += 1;
    }
    report.wall = started.elapsed();
    for mut inst in router.instances.drain(..) {
        add_cpu(
            &mut report.instance_cpu,
            cpu_time(&inst.child.id().to_string()),
        );
        drop(inst.stdin);
        let _ = inst.child.wait();
    }
    for (n, base) in cluster.nodes.iter().zip(&router.redis_base) {
        let used = cpu_time(&n.pid().to_string())
            .zip(*base)
            .map(|(a, b)| a - b);
        add_cpu(&mut report.redis_cpu, used);
    }
    report.router_cpu = cpu_time("self")
        .zip(router_cpu)
        .map(|(a, b)| a.saturating_sub(b));
    report
}

/// The faults, at a quarter, half and three quarters of the run.
fn fault(
    router: &mut Router<'_>,
    cluster: &mut RedisCluster,
    b: usize,
    batches: usize,
    report: &mut SimReport,
) {
    let k = router.instances.len();
    if b == batches / 4 {
        // SIGKILL an instance, start it again: cold filter, same partitions.
        let victim = k - 1;
        let pid = router.instances[victim].child.id().to_string();
        add_cpu(&mut report.instance_cpu, cpu_time(&pid));
        router.instances[victim].child.kill().unwrap();
        let _ = router.instances[victim].child.wait();
        let fresh = router.spawn();
        router.instances[victim] = fresh;
        router.start_owning(victim);
        report.events.push(format!(
            "batch {b}: instance {victim} SIGKILLed and restarted"
        ));
    }
    if b == batches / 2 && router.cfg.mode == Mode::Owned {
        // Hand partition 0 over to the next instance (with K = 1, to a
        // fresh owner namespace in the same process: released, re-owned).
        let p = 0;
        let from = router.owner[p];
        let to = (from + 1) % k;
        router.send(from, &format!("R {p}\n"));
        assert_eq!(router.answer(from), "ok");
        router.own(to, p);
        router.owner[p] = to;
        report.events.push(format!(
            "batch {b}: partition {p} handed from {from} to {to}"
        ));
    }
    if b == 3 * batches / 4 {
        // The master holding the most keys: the engine's state must be on
        // it for the restart to test anything.
        let sizes = cluster.dbsizes();
        let m = (0..sizes.len()).max_by_key(|&m| sizes[m]).unwrap();
        // Its first life's CPU counts up to here; its second from zero.
        let used = cpu_time(&cluster.nodes[m].pid().to_string())
            .zip(router.redis_base[m])
            .map(|(a, b)| a - b);
        add_cpu(&mut report.redis_cpu, used);
        router.redis_base[m] = Some(Duration::ZERO);
        cluster.nodes[m].restart_with(&[]);
        report.events.push(format!(
            "batch {b}: Cluster master {m} ({} of {} keys) restarted{}",
            sizes[m],
            sizes.iter().sum::<u64>(),
            if persistent() {
                " (AOF)"
            } else {
                " (no persistence)"
            }
        ));
    }
}

/// False when `TD_SIM_NO_AOF` is set: the masters then run without
/// persistence, and a restarted master comes back empty (the run shows
/// what that costs).
pub fn persistent() -> bool {
    std::env::var_os("TD_SIM_NO_AOF").is_none()
}

/// A 3-master Cluster whose masters keep an append-only file synced on
/// every write, so a restarted master has every acknowledged write.
pub fn start_cluster() -> RedisCluster {
    if !persistent() {
        return RedisCluster::start_with(3, &[]);
    }
    RedisCluster::start_with(3, &["--appendonly", "yes", "--appendfsync", "always"])
}

/// A one-line summary of a run and its check.
pub fn summary(cfg: &SimConfig, report: &SimReport, violations: &[Violation]) -> String {
    let news = report
        .records
        .iter()
        .filter(|r| r.duplicate_of.is_none())
        .count();
    let ns = |cpu| {
        report
            .ns_per_key(cpu)
            .map_or_else(|| "?".to_owned(), |ns| format!("{ns:.0}"))
    };
    // Duplicates of what a killed instance accepted without answering.
    let hidden: std::collections::HashSet<(u64, u64)> = report.hidden.iter().copied().collect();
    let of_hidden = report
        .records
        .iter()
        .filter(|r| r.duplicate_of.is_some_and(|t| hidden.contains(&(r.key, t))))
        .count();
    format!(
        "K={} {}: {} verdicts ({} new), {} resent ({} later duplicates of a killed \
         instance's unanswered acceptance), {:.1} s ({:.1} s in faults, slowest \
         batch {} {:.2} s), {:.0} keys/s, CPU ns/key: instances {} Redis {} router {}; \
         {} violations",
        cfg.instances,
        cfg.mode.name(),
        report.records.len(),
        news,
        report.unjudged,
        of_hidden,
        report.wall.as_secs_f64(),
        report.fault_wall.as_secs_f64(),
        report.slowest_batch.0,
        report.slowest_batch.1.as_secs_f64(),
        report.keys_per_sec(),
        ns(report.instance_cpu),
        ns(report.redis_cpu),
        ns(report.router_cpu),
        violations.len()
    )
}
