//! What makes two requests "the same request" (the payload fingerprint),
//! and whose key a key is (the scope).
//!
//! A key is claimed as `(scope, key)`: the engine fingerprints the scope's
//! length, the scope and the key together, so a key sent by one principal
//! never finds another principal's stored response. The payload
//! fingerprint decides `422`: a key claimed again with a different one is
//! [`tiered_dedup::Claim::Conflict`].

use bytes::Bytes;
use http::request::Parts;
use tiered_dedup::PayloadFingerprint;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// The scope a key belongs to: a tenant, an authenticated principal, an
/// API client id. Keys are only ever compared within one scope.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Scope(Vec<u8>);

impl Scope {
    /// The scope every request shares (the default: one key space).
    #[must_use]
    pub fn global() -> Self {
        Scope(Vec::new())
    }

    /// The scope's bytes.
    #[must_use]
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<Vec<u8>> for Scope {
    fn from(v: Vec<u8>) -> Self {
        Scope(v)
    }
}

impl From<String> for Scope {
    fn from(s: String) -> Self {
        Scope(s.into_bytes())
    }
}

impl From<&str> for Scope {
    fn from(s: &str) -> Self {
        Scope(s.as_bytes().to_vec())
    }
}

impl From<&[u8]> for Scope {
    fn from(s: &[u8]) -> Self {
        Scope(s.to_vec())
    }
}

/// The bytes claimed for `key` in `scope`: the scope's length (4 bytes,
/// big-endian), the scope, the key — unambiguous for any scope and key.
pub(crate) fn claim_key(scope: &Scope, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + scope.0.len() + key.len());
    out.extend_from_slice(&(scope.0.len() as u32).to_be_bytes());
    out.extend_from_slice(&scope.0);
    out.extend_from_slice(key);
    out
}

/// `f` of [`claim_key`]'s bytes, built on the stack when they fit in
/// 256 bytes (keys are short: no allocation per request).
pub(crate) fn with_claim_key<R>(scope: &Scope, key: &[u8], f: impl FnOnce(&[u8]) -> R) -> R {
    const ON_STACK: usize = 256;
    let len = 4 + scope.0.len() + key.len();
    if len > ON_STACK {
        return f(&claim_key(scope, key));
    }
    let mut buf = [0u8; ON_STACK];
    let (head, rest) = buf.split_at_mut(4);
    head.copy_from_slice(&(scope.0.len() as u32).to_be_bytes());
    let (s, rest) = rest.split_at_mut(scope.0.len());
    s.copy_from_slice(&scope.0);
    rest[..key.len()].copy_from_slice(key);
    f(&buf[..len])
}

/// The default payload fingerprint: xxh3-64 of the method, the request
/// target (path and query) and the body, each piece delimited. Two requests
/// that differ in any of them are a `422` when they share a key.
#[must_use]
pub fn method_target_body(parts: &Parts, body: &Bytes) -> PayloadFingerprint {
    let method = parts.method.as_str().as_bytes();
    let target = parts
        .uri
        .path_and_query()
        .map_or("/", http::uri::PathAndQuery::as_str)
        .as_bytes();
    // The same digest as streaming the pieces (xxh3 of their
    // concatenation); a small request is gathered on the stack and hashed
    // in one call, which costs a fraction of the streaming state's setup.
    const ON_STACK: usize = 512;
    let len = method.len() + 1 + target.len() + 1 + body.len();
    if len <= ON_STACK {
        let mut buf = [0u8; ON_STACK];
        let mut at = 0;
        for piece in [method, &[0], target, &[0], body] {
            buf[at..at + piece.len()].copy_from_slice(piece);
            at += piece.len();
        }
        return PayloadFingerprint(xxh3_64(&buf[..len]));
    }
    let mut h = Xxh3::new();
    h.update(method);
    h.update(&[0]);
    h.update(target);
    h.update(&[0]);
    h.update(body);
    PayloadFingerprint(h.digest())
}

/// A payload fingerprint over the method, the request target, and the body
/// as canonical JSON (object keys sorted, insignificant whitespace gone), so
/// a client that re-serializes the same document differently still gets
/// its replay. A body that is not JSON is fingerprinted as raw bytes.
/// (Feature `json`.)
#[cfg(feature = "json")]
#[must_use]
pub fn canonical_json(parts: &Parts, body: &Bytes) -> PayloadFingerprint {
    match serde_json::from_slice::<serde_json::Value>(body) {
        // serde_json's maps are sorted (BTreeMap) without `preserve_order`,
        // and its compact writer adds no whitespace.
        Ok(v) => method_target_body(parts, &Bytes::from(v.to_string())),
        Err(_) => method_target_body(parts, body),
    }
}

/// A payload fingerprint over the method, the request target and only the
/// JSON values at `pointers` (RFC 6901, e.g. `/amount`, `/payer/id`): fields
/// that may differ between retries (a client timestamp, a trace id) are
/// left out. A missing field counts as `null`; a body that is not JSON is
/// fingerprinted whole. (Feature `json`.)
///
/// ```
/// # #[cfg(feature = "json")] {
/// use tiered_dedup_http::{fingerprint, IdempotencyLayer};
/// # let engine = std::sync::Arc::new(tiered_dedup::Deduper::builder().build().unwrap());
/// let layer = IdempotencyLayer::builder(engine)
///     .fingerprint(fingerprint::json_fields(&["/amount", "/currency"]))
///     .build()
///     .unwrap();
/// # }
/// ```
#[cfg(feature = "json")]
pub fn json_fields(
    pointers: &[&str],
) -> impl Fn(&Parts, &Bytes) -> PayloadFingerprint + Send + Sync + 'static {
    let pointers: Vec<String> = pointers.iter().map(|p| (*p).to_owned()).collect();
    move |parts, body| match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => {
            let picked: Vec<&serde_json::Value> = pointers
                .iter()
                .map(|p| v.pointer(p).unwrap_or(&serde_json::Value::Null))
                .collect();
            let encoded = serde_json::to_vec(&picked).unwrap_or_default();
            method_target_body(parts, &Bytes::from(encoded))
        }
        Err(_) => method_target_body(parts, body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str) -> Parts {
        http::Request::builder()
            .method(method)
            .uri(uri)
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn each_piece_counts() {
        let b = Bytes::from_static(b"{\"amount\":1}");
        let base = method_target_body(&parts("POST", "/p"), &b);
        assert_eq!(base, method_target_body(&parts("POST", "/p"), &b.clone()));
        assert_ne!(base, method_target_body(&parts("PATCH", "/p"), &b));
        assert_ne!(base, method_target_body(&parts("POST", "/q"), &b));
        assert_ne!(base, method_target_body(&parts("POST", "/p?x=1"), &b));
        assert_ne!(
            base,
            method_target_body(&parts("POST", "/p"), &Bytes::from_static(b"{\"amount\":2}"))
        );
    }

    /// The one-call digest of a small request is the streaming digest, so
    /// records stored before it still match (no 422 after an upgrade).
    #[test]
    fn small_and_large_requests_digest_as_streamed() {
        for len in [0, 1, 100, 490, 491, 492, 600, 5000] {
            let body = Bytes::from((0..len).map(|i| (i * 7) as u8).collect::<Vec<u8>>());
            let p = parts("POST", "/payments?x=1");
            let mut h = Xxh3::new();
            h.update(b"POST\0/payments?x=1\0");
            h.update(&body);
            assert_eq!(
                method_target_body(&p, &body),
                PayloadFingerprint(h.digest()),
                "{len}"
            );
        }
    }

    #[test]
    fn scopes_never_collide_with_keys() {
        assert_ne!(
            claim_key(&Scope::from("a"), b"bc"),
            claim_key(&Scope::from("ab"), b"c")
        );
        assert_ne!(
            claim_key(&Scope::global(), b"k"),
            claim_key(&Scope::from("k"), b"")
        );
    }

    #[test]
    fn the_stack_built_claim_key_is_the_claim_key() {
        // 4 + 6 + 246 = 256 bytes: the largest built on the stack.
        for (scope, key) in [
            (Scope::global(), vec![b'k'; 3]),
            (Scope::from("tenant"), vec![b'k'; 246]),
            (Scope::from("tenant"), vec![b'k'; 247]),
            (Scope::from("tenant"), vec![b'k'; 1000]),
        ] {
            assert_eq!(
                with_claim_key(&scope, &key, <[u8]>::to_vec),
                claim_key(&scope, &key),
                "{} key bytes",
                key.len()
            );
        }
    }

    #[cfg(feature = "json")]
    #[test]
    fn json_fingerprints() {
        let p = parts("POST", "/p");
        let a = Bytes::from_static(b"{\"amount\": 1, \"currency\": \"EUR\", \"ts\": 5}");
        let b = Bytes::from_static(b"{\"ts\":6,\"currency\":\"EUR\",\"amount\":1}");
        assert_ne!(canonical_json(&p, &a), canonical_json(&p, &b));
        let c = Bytes::from_static(b"{\"currency\":\"EUR\",\"ts\":5,\"amount\":1}");
        assert_eq!(canonical_json(&p, &a), canonical_json(&p, &c));
        let f = json_fields(&["/amount", "/currency"]);
        assert_eq!(f(&p, &a), f(&p, &b));
        let d = Bytes::from_static(b"{\"amount\":2,\"currency\":\"EUR\"}");
        assert_ne!(f(&p, &a), f(&p, &d));
    }
}
