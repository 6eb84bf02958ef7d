//! The `idempotent_api` example as its users run it: a separate process
//! (built by `cargo test` with the other examples), driven over loopback.

#[path = "support/app.rs"]
mod app;
#[path = "../../../tests/support/redis_server.rs"]
mod redis_server;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use app::{pay, send};
use redis_server::RedisServer;

const LIMIT: Duration = Duration::from_secs(90);

async fn bounded<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(LIMIT, f)
        .await
        .expect("test over its time limit")
}

/// `target/<profile>/examples/idempotent_api`, next to this test's
/// `target/<profile>/deps/`.
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let path = dir.join("examples").join("idempotent_api");
    assert!(
        path.exists(),
        "{} is missing: `cargo test -p tiered-dedup-http` builds it",
        path.display()
    );
    path
}

/// One running instance of the example; killed on drop.
struct Instance {
    child: Child,
    addr: SocketAddr,
}

impl Instance {
    fn start(redis: Option<&str>) -> Instance {
        let mut cmd = Command::new(example_binary());
        cmd.args(["--listen", "127.0.0.1:0"]);
        if let Some(url) = redis {
            cmd.args(["--redis", url]);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting idempotent_api");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first line was {line:?}"))
            .parse()
            .unwrap();
        Instance { child, addr }
    }

    async fn executed(&self) -> u64 {
        let a = send(self.addr, "GET", "/stats", &[], b"").await.unwrap();
        assert_eq!(a.status, 200);
        a.json()["executed"].as_u64().unwrap()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The documented interface: 201 with `{id, amount}`, replay, 422,
/// `X-Fail`, `X-Delay-Ms`, 400, `GET /stats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    bounded(async {
        let api = Instance::start(None);
        let first = pay(api.addr, "ex-1", 42, &[]).await;
        assert_eq!(first.status, 201);
        let v = first.json();
        assert_eq!(v["amount"], 42);
        assert!(v["id"].is_string());
        let replay = pay(api.addr, "ex-1", 42, &[]).await;
        assert!(replay.is_replay());
        assert_eq!(replay.body, first.body);
        assert_eq!(pay(api.addr, "ex-1", 43, &[]).await.status, 422);
        let failed = pay(api.addr, "ex-2", 1, &[("x-fail", "1")]).await;
        assert_eq!(failed.status, 500);
        let second = pay(api.addr, "ex-2", 1, &[]).await;
        assert_eq!(second.status, 201);
        assert_ne!(second.json()["id"], v["id"], "an id per handler run");
        let addr = api.addr;
        let slow =
            tokio::spawn(async move { pay(addr, "ex-3", 5, &[("x-delay-ms", "500")]).await });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(pay(api.addr, "ex-3", 5, &[]).await.status, 409);
        assert_eq!(slow.await.unwrap().status, 201);
        let missing = send(api.addr, "POST", "/payments", &[], b"{\"amount\":1}")
            .await
            .unwrap();
        assert_eq!(missing.status, 400);
        assert_eq!(api.executed().await, 4);
    })
    .await;
}

/// Two processes of the example on one Redis: one run across both, and a
/// restarted process still replays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_example_processes_on_one_redis() {
    bounded(async {
        let server = RedisServer::start();
        let url = server.url();
        let a = Instance::start(Some(&url));
        let b = Instance::start(Some(&url));
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let addr = if i % 2 == 0 { a.addr } else { b.addr };
                tokio::spawn(async move { pay(addr, "procs", 9, &[("x-delay-ms", "300")]).await })
            })
            .collect();
        for t in tasks {
            let s = t.await.unwrap().status.as_u16();
            assert!(s == 201 || s == 409, "{s}");
        }
        assert_eq!(a.executed().await + b.executed().await, 1);
        let replay = pay(b.addr, "procs", 9, &[]).await;
        assert!(replay.is_replay());
        drop(a);
        let restarted = Instance::start(Some(&url));
        let again = pay(restarted.addr, "procs", 9, &[]).await;
        assert!(again.is_replay());
        assert_eq!(again.body, replay.body);
        assert_eq!(restarted.executed().await, 0);
    })
    .await;
}

/// With `--redis` and Redis down, the example fails closed: 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_fails_closed_without_redis() {
    bounded(async {
        let mut server = RedisServer::start();
        let url = server.url();
        server.kill();
        let api = Instance::start(Some(&url));
        let down = pay(api.addr, "no-redis", 1, &[]).await;
        assert_eq!(down.status, 503);
        assert_eq!(down.problem(), "store-unavailable");
        assert_eq!(api.executed().await, 0);
    })
    .await;
}
