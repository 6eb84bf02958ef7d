//! `dedup --exact redis://…`: two runs against one private `redis-server`
//! deduplicate across the run boundary, through Redis alone.

#[path = "../../tests/support/redis_server.rs"]
mod redis_server;

use std::io::Write;
use std::process::{Command, Stdio};

use redis_server::RedisServer;

fn dedup(args: &[&str], input: &str) -> (String, String, i32) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_dedup"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running dedup");
    // A run refused at its flags exits before reading: a broken pipe here
    // is that, and the exit status tells.
    let _ = child.stdin.take().unwrap().write_all(input.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
        out.status.code().unwrap_or(-1),
    )
}

#[test]
fn smoke() {
    let server = RedisServer::start();
    let url = server.url();
    let (out, _, code) = dedup(&["-q", "--exact", &url], "a\nb\na\n");
    assert_eq!((out.as_str(), code), ("a\nb\n", 0));
}

#[test]
fn a_second_run_remembers_the_first_through_redis() {
    let server = RedisServer::start();
    let url = server.url();
    let first: String = (0..5_000).map(|i| format!("order-{i}\n")).collect();
    let (out, err, code) = dedup(&["-q", "--exact", &url, "--window", "1h"], &first);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, first);
    // The second run repeats half of the first run's records and adds new
    // ones: only the new ones come out (its filter starts cold, so every
    // record is confirmed in Redis).
    let second: String = (2_500..7_500).map(|i| format!("order-{i}\n")).collect();
    let (out, err, code) = dedup(&["-q", "--exact", &url, "--window", "1h"], &second);
    assert_eq!(code, 0, "{err}");
    let expected: String = (5_000..7_500).map(|i| format!("order-{i}\n")).collect();
    assert_eq!(out, expected);
}

#[test]
fn state_with_redis_is_refused() {
    let server = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("td-cli-redis-{}", std::process::id()));
    let (_, err, code) = dedup(
        &["--exact", &server.url(), "--state", dir.to_str().unwrap()],
        "a\n",
    );
    assert_eq!(code, 1);
    assert!(err.contains("drop --state"), "{err}");
}
