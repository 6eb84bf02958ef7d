//! A private three-master Redis Cluster on loopback ports for a test:
//! three `redis-server --cluster-enabled yes` nodes (each a
//! [`RedisServer`], so each is stopped on drop), joined with
//! `redis-cli --cluster create … --cluster-replicas 0`, ready once every
//! node reports `cluster_state:ok`. Needs `super::redis_server`.
#![allow(dead_code)] // each test crate uses a different part

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::redis_server::{free_port, RedisServer};

pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts `masters` nodes and joins them into one cluster, hash slots
    /// split evenly, no replicas.
    pub fn start(masters: usize) -> Self {
        Self::start_with(masters, &[])
    }

    /// [`RedisCluster::start`] with extra `redis-server` arguments on every
    /// node (persistence, say).
    pub fn start_with(masters: usize, extra: &[&str]) -> Self {
        let node = || {
            // The default bus port (`port + 10000`) may be taken, or above
            // 65535; a node that exits at start gets a new bus port too.
            (0..5)
                .find_map(|_| {
                    let bus = free_port().to_string();
                    let mut args = vec![
                        "--cluster-enabled",
                        "yes",
                        // Each node has its own directory: one name fits all.
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-port",
                        &bus,
                        "--cluster-node-timeout",
                        "5000",
                    ];
                    args.extend_from_slice(extra);
                    RedisServer::try_start_with(&args)
                })
                .expect("a cluster node exited at start on 5 ports in a row")
        };
        let nodes: Vec<RedisServer> = (0..masters).map(|_| node()).collect();
        let cluster = RedisCluster { nodes };
        let mut create = Command::new("redis-cli");
        create.args(["--cluster", "create"]);
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect(
                "running redis-cli (installed with redis-server: `apt-get install redis-server`)",
            );
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok();
        cluster
    }

    /// Waits until every node says `cluster_state:ok` and knows every
    /// other node (10 s at most).
    pub fn wait_ok(&self) {
        let start = Instant::now();
        loop {
            let ready = self.nodes.iter().all(|n| {
                let mut c = n.connection();
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut c)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
            });
            if ready {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the cluster on ports {:?} did not reach cluster_state:ok",
                self.ports()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:<port>` of every node (the seeds).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Deletes every key on every master.
    pub fn flush_all(&self) {
        for n in &self.nodes {
            let _: () = redis::cmd("FLUSHALL").query(&mut n.connection()).unwrap();
        }
    }

    /// Keys held by each node (`DBSIZE`), in node order.
    pub fn dbsizes(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| redis::cmd("DBSIZE").query(&mut n.connection()).unwrap())
            .collect()
    }
}
