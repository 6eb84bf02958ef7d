//! Free loopback ports, and fresh directories, for the test servers.
//!
//! A port taken from the system with `bind(127.0.0.1:0)` lies in the
//! kernel's ephemeral range, the same range every outgoing connection
//! takes its local port from. Between the probe and the server's own
//! `bind`, a client socket of a test running beside it may take that port,
//! and the server exits with "address in use" (seen in CI: a
//! `redis-server` that "did not start"). The same can happen to a server
//! restarted on its port. So the ports here come from below the ephemeral
//! range, where no outgoing connection lands, at random, each probed
//! before it is handed out.
#![allow(dead_code)] // each test crate uses a different part

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The lowest port the test servers use.
const FLOOR: u32 = 20_000;

/// The first port of the kernel's ephemeral range (32768 by default).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A port nothing listens on now, below the ephemeral range; a port from
/// the system when that range leaves too little room below it.
pub fn free_port() -> u16 {
    static DRAWS: AtomicU64 = AtomicU64::new(0);
    let ceiling = ephemeral_low().min(65_536);
    if ceiling < FLOOR + 1_000 {
        return system_port();
    }
    let seed = u64::from(std::process::id()) << 32
        ^ SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
    for _ in 0..1_000 {
        let draw = DRAWS.fetch_add(1, Ordering::Relaxed);
        let port = FLOOR + (mix(seed ^ draw) % u64::from(ceiling - FLOOR)) as u32;
        let port = u16::try_from(port).expect("below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    system_port()
}

fn system_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// splitmix64's finalizer: nearby seeds give unrelated ports.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A new, empty directory for a `kind` server on `port`: unique within the
/// process too, since two servers of one test binary may draw one port
/// (the loser exits at start, and its cleanup must not remove the
/// winner's files).
pub fn fresh_dir(kind: &str, port: u16) -> PathBuf {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let n = SERIAL.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("td-{kind}-{port}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
