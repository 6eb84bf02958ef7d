//! What the tier checks of a server before it trusts it with accepted
//! keys: that it never evicts them (`maxmemory-policy noeviction`) and
//! that it is not a replica (read-only, its data replaced by its master's);
//! and, as a warning, whether it keeps them across its own restart (the
//! append-only file).
//! [`super::RedisTier::check`] runs it for the host at start; every
//! connection a partition opens runs it again, with the same rule
//! ([`UnsafeServer`]).

use std::sync::atomic::Ordering;

use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo};
use redis::Value;

use super::conn::Conn;
use super::{error, RedisStats, UnsafeServer};
use crate::error::{ExactTierError, FailureCause};

/// What the tier found out about the servers it uses
/// ([`super::RedisTier::check`]).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ServerInfo {
    /// The single server, or every master of a Cluster.
    pub nodes: Vec<NodeInfo>,
}

/// One server's settings that decide whether it keeps accepted keys.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NodeInfo {
    /// Where (no password).
    pub address: String,
    /// Its `maxmemory-policy`; `None` when `CONFIG GET` is disabled,
    /// renamed or not allowed to the user: not checked.
    pub maxmemory_policy: Option<String>,
    /// Its role (`master`, `slave`, …) from `ROLE` or `INFO replication`;
    /// `None` when neither is allowed: not checked.
    pub role: Option<String>,
    /// Its `appendonly` setting; `None` when `CONFIG GET` is not allowed.
    pub appendonly: Option<bool>,
    /// Its `save` points (`""`: no snapshots); `None` when `CONFIG GET`
    /// is not allowed.
    pub save: Option<String>,
}

impl NodeInfo {
    /// True when the server may evict keys to make room (any
    /// `maxmemory-policy` but `noeviction`; `volatile-*` ones evict keys
    /// with a TTL, which the tier's keys have with a window): whatever
    /// `maxmemory` is now, since it can be set at run time.
    #[must_use]
    pub fn evicts(&self) -> bool {
        self.maxmemory_policy
            .as_deref()
            .is_some_and(|p| p != "noeviction")
    }

    /// True for a replica: read-only (unless configured otherwise), and
    /// its data is replaced by its master's on every full resync.
    #[must_use]
    pub fn is_replica(&self) -> bool {
        matches!(self.role.as_deref(), Some("slave" | "replica"))
    }

    /// True when a restart of the server forgets accepted keys: no
    /// append-only file (with only `save` snapshots, those written since
    /// the last one; with neither, all of them).
    #[must_use]
    pub fn forgets_on_restart(&self) -> bool {
        self.appendonly == Some(false)
    }
}

impl ServerInfo {
    /// Why these servers would lose accepted keys, one sentence each, with
    /// what to change; empty when nothing was found.
    #[must_use]
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for n in &self.nodes {
            if n.evicts() {
                problems.push(format!(
                    "{} evicts keys when it is full (maxmemory-policy {}): accepted keys would \
                     be forgotten and accepted again; set maxmemory-policy noeviction on the \
                     server, or RedisConfig::unsafe_server = UnsafeServer::Warn to run anyway",
                    n.address,
                    n.maxmemory_policy.as_deref().unwrap_or("")
                ));
            }
            if n.is_replica() {
                problems.push(format!(
                    "{} is a replica (role {}): it is read-only and its data follows its \
                     master's; connect to the master, or RedisConfig::unsafe_server = \
                     UnsafeServer::Warn to run anyway",
                    n.address,
                    n.role.as_deref().unwrap_or("")
                ));
            }
        }
        problems
    }

    /// What would make these servers lose accepted keys when they restart
    /// (no append-only file), one sentence each: a warning, not a refusal —
    /// a server kept up by replicas and failover, or a run that may repeat
    /// keys after a Redis restart, can do without it.
    #[must_use]
    pub fn warnings(&self) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|n| n.forgets_on_restart())
            .map(|n| {
                let kept = match n.save.as_deref() {
                    Some("") => "keeps nothing on disk (appendonly no, no save points)".to_owned(),
                    Some(points) => {
                        format!("keeps only periodic snapshots (appendonly no, save {points})")
                    }
                    None => "has no append-only file (appendonly no)".to_owned(),
                };
                let lost = if n.save.as_deref() == Some("") {
                    "every accepted key is forgotten"
                } else {
                    "the keys accepted since its last snapshot are forgotten"
                };
                format!(
                    "{} {kept}: if it restarts, {lost} and accepted again; set appendonly yes \
                     (appendfsync always loses none, everysec up to a second)",
                    n.address
                )
            })
            .collect()
    }

    /// What could not be checked (a command disabled, renamed or not
    /// allowed), one sentence each.
    #[must_use]
    pub fn unchecked(&self) -> Vec<String> {
        let mut unchecked = Vec::new();
        for n in &self.nodes {
            if n.maxmemory_policy.is_none() {
                unchecked.push(format!(
                    "{}: could not check maxmemory-policy (CONFIG GET is disabled, renamed or \
                     not allowed): make sure it is noeviction",
                    n.address
                ));
            }
            if n.role.is_none() {
                unchecked.push(format!(
                    "{}: could not check the role (ROLE and INFO are not allowed): make sure \
                     it is a master",
                    n.address
                ));
            }
        }
        unchecked
    }
}

/// Asks the server(s) behind `conn` (`address` names a single server).
pub(super) fn inspect(conn: &mut Conn, address: &str) -> redis::RedisResult<ServerInfo> {
    let mut config = redis::cmd("CONFIG");
    config.arg("GET").arg("maxmemory-policy");
    let mut appendonly = redis::cmd("CONFIG");
    appendonly.arg("GET").arg("appendonly");
    let mut save = redis::cmd("CONFIG");
    save.arg("GET").arg("save");
    match conn {
        Conn::Single(_) => {
            let replies = conn.pipeline_each(&[config, redis::cmd("ROLE"), appendonly, save])?;
            let maxmemory_policy = replies.first().and_then(config_value);
            let appendonly = replies.get(2).and_then(config_value).map(|v| v == "yes");
            let save = replies.get(3).and_then(config_value);
            let role = match replies.get(1) {
                Some(Value::Array(items)) => items.first().and_then(text),
                _ => {
                    // ROLE not allowed: INFO replication says it too.
                    let mut info = redis::cmd("INFO");
                    info.arg("replication");
                    conn.pipeline_each(&[info])?
                        .first()
                        .and_then(text)
                        .and_then(|info| {
                            info.lines()
                                .find_map(|l| l.strip_prefix("role:"))
                                .map(|r| r.trim().to_owned())
                        })
                }
            };
            Ok(ServerInfo {
                nodes: vec![NodeInfo {
                    address: address.to_owned(),
                    maxmemory_policy,
                    role,
                    appendonly,
                    save,
                }],
            })
        }
        Conn::Cluster(c) => {
            // Every master (the cluster client writes to masters only).
            let routing = || RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
            // Per master, the value of a `CONFIG GET` asked of every master.
            let mut per_master = |cmd: &redis::Cmd| -> Option<Vec<(String, Option<String>)>> {
                match c.route_command(cmd, routing()) {
                    Ok(Value::Map(per_node)) => Some(
                        per_node
                            .iter()
                            .map(|(addr, v)| (text(addr).unwrap_or_default(), config_value(v)))
                            .collect(),
                    ),
                    _ => None,
                }
            };
            let policies = per_master(&config);
            let appendonly = per_master(&appendonly);
            let save = per_master(&save);
            let of = |list: &Option<Vec<(String, Option<String>)>>, addr: &str| {
                list.as_ref()
                    .and_then(|l| l.iter().find(|(a, _)| a == addr))
                    .and_then(|(_, v)| v.clone())
            };
            let nodes = match &policies {
                Some(per_node) => per_node
                    .iter()
                    .map(|(addr, policy)| NodeInfo {
                        address: addr.clone(),
                        maxmemory_policy: policy.clone(),
                        role: Some("master".to_owned()),
                        appendonly: of(&appendonly, addr).map(|v| v == "yes"),
                        save: of(&save, addr),
                    })
                    .collect(),
                // CONFIG refused somewhere: not checked.
                None => vec![NodeInfo {
                    address: address.to_owned(),
                    maxmemory_policy: None,
                    role: Some("master".to_owned()),
                    appendonly: None,
                    save: None,
                }],
            };
            Ok(ServerInfo { nodes })
        }
    }
}

/// Applies the rule to what `inspect` found: under
/// [`UnsafeServer::Refuse`] a server that would lose accepted keys is an
/// error; under [`UnsafeServer::Warn`] it is counted and reported. What
/// could not be checked is counted and reported either way.
pub(super) fn judge(
    info: &ServerInfo,
    rule: UnsafeServer,
    stats: &RedisStats,
    server: &str,
) -> Result<(), ExactTierError> {
    let problems = info.problems();
    if !problems.is_empty() {
        match rule {
            UnsafeServer::Refuse => {
                return Err(error::failure(
                    server,
                    FailureCause::UnsafeServer,
                    problems.join("; "),
                ));
            }
            UnsafeServer::Warn => {
                let before = stats.server_warnings.fetch_add(1, Ordering::Relaxed);
                if before == 0 {
                    crate::trace::event!(warn, problems = %problems.join("; "), "running on a Redis that may lose accepted keys (UnsafeServer::Warn)");
                }
            }
        }
    }
    let warnings = info.warnings();
    if !warnings.is_empty() {
        let before = stats.server_volatile.fetch_add(1, Ordering::Relaxed);
        if before == 0 {
            crate::trace::event!(warn, warnings = %warnings.join("; "), "running on a Redis that forgets accepted keys when it restarts");
        }
    }
    let unchecked = info.unchecked();
    if !unchecked.is_empty() {
        let before = stats.server_unchecked.fetch_add(1, Ordering::Relaxed);
        if before == 0 {
            crate::trace::event!(warn, unchecked = %unchecked.join("; "), "could not check whether Redis keeps accepted keys");
        }
    }
    Ok(())
}

/// The value of a `CONFIG GET` reply (`[name, value]`, or a map in RESP3).
fn config_value(v: &Value) -> Option<String> {
    match v {
        Value::Array(items) if items.len() == 2 => text(&items[1]),
        Value::Map(pairs) => pairs.first().and_then(|(_, v)| text(v)),
        _ => None,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) | Value::VerbatimString { text: s, .. } => Some(s.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(policy: Option<&str>, role: Option<&str>) -> NodeInfo {
        NodeInfo {
            address: "redis://h:1".to_owned(),
            maxmemory_policy: policy.map(str::to_owned),
            role: role.map(str::to_owned),
            appendonly: Some(true),
            save: Some(String::new()),
        }
    }

    #[test]
    fn a_server_without_an_append_only_file_is_a_warning() {
        let with = |appendonly: Option<bool>, save: Option<&str>| ServerInfo {
            nodes: vec![NodeInfo {
                appendonly,
                save: save.map(str::to_owned),
                ..node(Some("noeviction"), Some("master"))
            }],
        };
        assert!(with(Some(true), Some("")).warnings().is_empty());
        assert!(with(None, None).warnings().is_empty());
        let nothing = with(Some(false), Some("")).warnings();
        assert_eq!(nothing.len(), 1);
        assert!(nothing[0].contains("keeps nothing on disk"), "{nothing:?}");
        let snapshots = with(Some(false), Some("3600 1 300 100")).warnings();
        assert!(
            snapshots[0].contains("save 3600 1 300 100"),
            "{snapshots:?}"
        );
        assert!(
            with(Some(false), Some("")).problems().is_empty(),
            "not a refusal"
        );
    }

    #[test]
    fn only_a_master_that_never_evicts_is_safe() {
        let safe = ServerInfo {
            nodes: vec![node(Some("noeviction"), Some("master"))],
        };
        assert!(safe.problems().is_empty() && safe.unchecked().is_empty());
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-ttl",
        ] {
            let info = ServerInfo {
                nodes: vec![node(Some(policy), Some("master"))],
            };
            let problems = info.problems();
            assert_eq!(problems.len(), 1, "{policy}");
            assert!(problems[0].contains(policy), "{problems:?}");
        }
        let replica = ServerInfo {
            nodes: vec![node(Some("noeviction"), Some("slave"))],
        };
        assert!(replica.problems()[0].contains("is a replica"));
        let unknown = ServerInfo {
            nodes: vec![node(None, None)],
        };
        assert!(unknown.problems().is_empty());
        assert_eq!(unknown.unchecked().len(), 2);
    }
}
