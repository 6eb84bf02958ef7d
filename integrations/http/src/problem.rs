//! The layer's own answers: RFC 9457 problem details
//! (`application/problem+json`), one problem type per answer.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

/// The answers the layer gives itself, without running the handler. Each is
/// a problem type: its URI is the layer's
/// [problem type base](crate::IdempotencyLayerBuilder::problem_type_base)
/// followed by [`ProblemKind::slug`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProblemKind {
    /// `400`: the request has no `Idempotency-Key` and its method needs one.
    MissingKey,
    /// `400`: the key is not an sf-string, is empty, too long, or repeated.
    InvalidKey,
    /// `400`: the request body could not be read (the client went away or
    /// sent a malformed body).
    UnreadableBody,
    /// `413`: the request body is over the layer's cap (it must be read
    /// whole to fingerprint it).
    RequestTooLarge,
    /// `409`: a request with this key is being processed now; retry after
    /// `Retry-After` seconds.
    InProgress,
    /// `422`: the key was used for a different request (method, target or
    /// body, or what the fingerprint function looks at).
    KeyReused,
    /// `410`: the key's request was processed, but its response was not
    /// stored (its body was over the cap, or it was completed by something
    /// other than this layer): it cannot be replayed.
    ResponseNotStored,
    /// `503`: the idempotency store cannot be reached; nothing was done.
    /// Retry after `Retry-After` seconds.
    StoreUnavailable,
}

impl ProblemKind {
    /// The HTTP status.
    #[must_use]
    pub fn status(self) -> StatusCode {
        match self {
            ProblemKind::MissingKey | ProblemKind::InvalidKey | ProblemKind::UnreadableBody => {
                StatusCode::BAD_REQUEST
            }
            ProblemKind::RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProblemKind::InProgress => StatusCode::CONFLICT,
            ProblemKind::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
            ProblemKind::ResponseNotStored => StatusCode::GONE,
            ProblemKind::StoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The last segment of the problem type URI.
    #[must_use]
    pub fn slug(self) -> &'static str {
        match self {
            ProblemKind::MissingKey => "missing-key",
            ProblemKind::InvalidKey => "invalid-key",
            ProblemKind::UnreadableBody => "unreadable-body",
            ProblemKind::RequestTooLarge => "request-too-large",
            ProblemKind::InProgress => "in-progress",
            ProblemKind::KeyReused => "key-reused",
            ProblemKind::ResponseNotStored => "response-not-stored",
            ProblemKind::StoreUnavailable => "store-unavailable",
        }
    }

    /// The problem's title (the same for every occurrence).
    #[must_use]
    pub fn title(self) -> &'static str {
        match self {
            ProblemKind::MissingKey => "Idempotency-Key header missing",
            ProblemKind::InvalidKey => "Idempotency-Key header malformed",
            ProblemKind::UnreadableBody => "Request body unreadable",
            ProblemKind::RequestTooLarge => "Request body too large for an idempotent request",
            ProblemKind::InProgress => "A request with this Idempotency-Key is being processed",
            ProblemKind::KeyReused => "Idempotency-Key reused for a different request",
            ProblemKind::ResponseNotStored => {
                "The request with this Idempotency-Key was processed; its response cannot be replayed"
            }
            ProblemKind::StoreUnavailable => "Idempotency store unavailable",
        }
    }
}

/// One problem response to build.
pub(crate) struct Problem {
    pub kind: ProblemKind,
    pub detail: String,
    pub retry_after: Option<Duration>,
    /// Extension members, already JSON values.
    pub extensions: Vec<(&'static str, String)>,
}

impl Problem {
    pub(crate) fn new(kind: ProblemKind, detail: impl Into<String>) -> Self {
        Problem {
            kind,
            detail: detail.into(),
            retry_after: None,
            extensions: Vec::new(),
        }
    }

    pub(crate) fn retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub(crate) fn extension(mut self, name: &'static str, json_value: String) -> Self {
        self.extensions.push((name, json_value));
        self
    }

    /// The response: status, `Content-Type: application/problem+json`,
    /// `Retry-After` in whole seconds (at least 1) when set, and the
    /// document.
    pub(crate) fn into_response(self, type_base: &str) -> Response<Bytes> {
        let status = self.kind.status();
        let mut body = String::with_capacity(256);
        body.push_str("{\"type\":");
        json_string(&mut body, &format!("{type_base}{}", self.kind.slug()));
        body.push_str(",\"title\":");
        json_string(&mut body, self.kind.title());
        let _ = write!(body, ",\"status\":{}", status.as_u16());
        body.push_str(",\"detail\":");
        json_string(&mut body, &self.detail);
        for (name, value) in &self.extensions {
            body.push(',');
            json_string(&mut body, name);
            body.push(':');
            body.push_str(value);
        }
        body.push('}');
        let mut response = Response::new(Bytes::from(body));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(after) = self.retry_after {
            let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        response
    }
}

/// Appends `s` as a JSON string (RFC 8259 escapes).
pub(crate) fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_valid_json_with_its_headers() {
        let r = Problem::new(ProblemKind::InProgress, "key \"k\"\n\u{1}")
            .retry_after(Duration::from_millis(1500))
            .extension("first_status", "201".to_owned())
            .into_response("tag:x:");
        assert_eq!(r.status(), StatusCode::CONFLICT);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let v: serde_json::Value = serde_json::from_slice(r.body()).unwrap();
        assert_eq!(v["type"], "tag:x:in-progress");
        assert_eq!(v["status"], 409);
        assert_eq!(v["detail"], "key \"k\"\n\u{1}");
        assert_eq!(v["first_status"], 201);
    }
}
