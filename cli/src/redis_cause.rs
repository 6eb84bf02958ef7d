//! Saying why Redis failed: the engine's `Unavailable` verdicts carry no
//! cause, so after a failure the program asks the server itself (a fresh
//! connection, `PING`, `ROLE`, and the write of one probe key that expires
//! in a second, under the engine's own `td:` prefix) and reports what it
//! answers. URLs are shown without their password.

use std::time::Duration;

/// How long the look at the server may take.
const DIAGNOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// `url` with its password replaced by `***`
/// (`redis://user:***@host:6379/0`).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{path}")
            } else {
                // `redis://secret@host`: the lone name is the password.
                format!("{scheme}://***@{host}{path}")
            }
        }
        None => url.to_owned(),
    }
}

/// What the server at `url` says now: why it cannot be used, or that it
/// answers.
pub fn diagnose(url: &str) -> String {
    let client = match redis::Client::open(url) {
        Ok(client) => client,
        Err(e) => return format!("the URL is not usable: {e}"),
    };
    let mut conn = match client.get_connection_with_timeout(DIAGNOSE_TIMEOUT) {
        Ok(conn) => conn,
        Err(e) => return format!("cannot connect: {e}"),
    };
    let _ = conn.set_read_timeout(Some(DIAGNOSE_TIMEOUT));
    let _ = conn.set_write_timeout(Some(DIAGNOSE_TIMEOUT));
    if let Err(e) = redis::cmd("PING").query::<redis::Value>(&mut conn) {
        return format!("PING failed: {e}");
    }
    if let Ok(role) = redis::cmd("ROLE").query::<Vec<redis::Value>>(&mut conn) {
        if matches!(role.first(), Some(redis::Value::BulkString(r)) if r == b"slave") {
            return "the server is a read-only replica: marks cannot be written there".to_owned();
        }
    }
    let probe = redis::cmd("SET")
        .arg("td:dedup-cli:probe")
        .arg(1)
        .arg("PX")
        .arg(1000)
        .query::<redis::Value>(&mut conn);
    match probe {
        Err(e) => format!("it refuses writes: {e}"),
        Ok(_) => "the server answers now: it failed or was too slow during the run".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        assert_eq!(
            redact("redis://user:secret@127.0.0.1:6379/2"),
            "redis://user:***@127.0.0.1:6379/2"
        );
        assert_eq!(
            redact("redis://:secret@127.0.0.1:6379"),
            "redis://:***@127.0.0.1:6379"
        );
        assert_eq!(redact("redis://secret@host"), "redis://***@host");
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[test]
    fn nothing_listening_is_a_connection_failure() {
        // A port just released: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let why = diagnose(&format!("redis://127.0.0.1:{port}"));
        assert!(why.starts_with("cannot connect"), "{why}");
    }
}
