//! Redis failures as [`ExactTierError`]s that name their cause and the
//! server (never its password).

use redis::{ErrorKind, RedisError, ServerErrorKind};

use super::RedisConfig;
use crate::error::{ExactTierError, FailureCause};

/// What went wrong, from the client's error.
pub(super) fn cause_of(e: &RedisError) -> FailureCause {
    if e.is_connection_refusal() {
        return FailureCause::ConnectionRefused;
    }
    if e.is_timeout() {
        return FailureCause::Timeout;
    }
    if let Some(cause) = e.code().and_then(cause_of_code) {
        return cause;
    }
    match (e.kind(), e.code()) {
        (ErrorKind::AuthenticationFailed, _) => FailureCause::AuthenticationFailed,
        (ErrorKind::Server(ServerErrorKind::NoScript), _) => FailureCause::Script,
        // A transaction discarded: the reason is the refused command's
        // code ("EXECABORT Transaction discarded because of: OOM …").
        (ErrorKind::Server(ServerErrorKind::ExecAbort), _) => e
            .detail()
            .and_then(|d| d.split("because of: ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(cause_of_code)
            .unwrap_or(FailureCause::Other),
        (
            ErrorKind::Server(
                ServerErrorKind::Moved
                | ServerErrorKind::Ask
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::CrossSlot,
            )
            | ErrorKind::ClusterConnectionNotFound,
            _,
        ) => FailureCause::Cluster,
        (ErrorKind::InvalidClientConfig, _) => FailureCause::InvalidConfig,
        (ErrorKind::Parse | ErrorKind::UnexpectedReturnType, _) => FailureCause::UnexpectedReply,
        (ErrorKind::Io, _) => FailureCause::ConnectionLost,
        // A script's own error names the script ("... script: ...").
        _ if e.detail().is_some_and(|d| d.contains("script")) => FailureCause::Script,
        // A key the tier uses holds another type: data it did not write.
        (_, Some("WRONGTYPE")) => FailureCause::UnexpectedReply,
        _ => FailureCause::Other,
    }
}

/// What an error reply's code (its first word) names, if it names one.
pub(super) fn cause_of_code(code: &str) -> Option<FailureCause> {
    Some(match code {
        "NOAUTH" | "WRONGPASS" => FailureCause::AuthenticationFailed,
        "NOPERM" => FailureCause::PermissionDenied,
        "READONLY" => FailureCause::ReadOnly,
        "LOADING" => FailureCause::Loading,
        "OOM" => FailureCause::OutOfMemory,
        "NOSCRIPT" | "BUSY" => FailureCause::Script,
        "MOVED" | "ASK" | "TRYAGAIN" | "CLUSTERDOWN" | "CROSSSLOT" => FailureCause::Cluster,
        _ => return None,
    })
}

/// `url` without its password: `redis://user:***@host:port/db`, and a
/// `password=`/`pass=` query parameter likewise.
pub(super) fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:***@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let path = match path.split_once('?') {
        Some((path, query)) => {
            let query: Vec<String> = query
                .split('&')
                .map(|pair| match pair.split_once('=') {
                    Some((key, _)) if matches!(key, "password" | "pass") => format!("{key}=***"),
                    _ => pair.to_owned(),
                })
                .collect();
            format!("{path}?{}", query.join("&"))
        }
        None => path.to_owned(),
    };
    if scheme.is_empty() {
        format!("{authority}{path}")
    } else {
        format!("{scheme}://{authority}{path}")
    }
}

/// How errors name the server: the single server's URL, or the cluster's
/// seeds, without passwords.
pub(super) fn server_name(config: &RedisConfig) -> String {
    let urls: Vec<String> = config.urls.iter().map(|u| redact(u)).collect();
    if config.cluster {
        format!("the cluster of {}", urls.join(", "))
    } else {
        urls.join(", ")
    }
}

/// `e` from the server `server`.
pub(super) fn remote(server: &str, e: &RedisError) -> ExactTierError {
    ExactTierError::Remote {
        server: server.to_owned(),
        cause: cause_of(e),
        detail: e.to_string(),
    }
}

/// A failure of `cause` at `server`, described by `detail`.
pub(super) fn failure(
    server: &str,
    cause: FailureCause,
    detail: impl Into<String>,
) -> ExactTierError {
    ExactTierError::Remote {
        server: server.to_owned(),
        cause,
        detail: detail.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_discarded_transaction_names_the_refusal_that_discarded_it() {
        let abort = |detail: &str| {
            RedisError::from((
                ErrorKind::Server(ServerErrorKind::ExecAbort),
                "EXECABORT",
                detail.to_owned(),
            ))
        };
        assert_eq!(
            cause_of(&abort(
                "Transaction discarded because of: OOM command not allowed when used memory > 'maxmemory'."
            )),
            FailureCause::OutOfMemory
        );
        assert_eq!(
            cause_of(&abort(
                "Transaction discarded because of: READONLY You can't write against a read only replica."
            )),
            FailureCause::ReadOnly
        );
        assert_eq!(
            cause_of(&abort("Transaction discarded because of previous errors.")),
            FailureCause::Other
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(
            redact("redis://:s3cret@127.0.0.1:6379/2"),
            "redis://:***@127.0.0.1:6379/2"
        );
        assert_eq!(
            redact("redis://alice:s3cret@host:1/0"),
            "redis://alice:***@host:1/0"
        );
        assert_eq!(redact("redis://alice@host:1"), "redis://alice@host:1");
        assert_eq!(
            redact("redis+unix:///tmp/r.sock?db=1&pass=s3cret"),
            "redis+unix:///tmp/r.sock?db=1&pass=***"
        );
        assert!(!redact("redis://u:p@ss@host:1").contains("p@ss"));
    }
}
