//! [`IdempotencyLayer`] and its builder: which requests need a key, how a
//! key is read and scoped, what makes two requests the same, what is stored
//! and how long a retry waits.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderName, Method, StatusCode};
use tiered_dedup::{Deduper, PayloadFingerprint};
use tower_layer::Layer;

use crate::fingerprint::{method_target_body, Scope};
use crate::key::KeySyntax;
use crate::service::Idempotency;
use crate::stats::IdempotencyStats;
use crate::store::{Dispatch, Store};

/// The scope function's type.
pub(crate) type ScopeFn = dyn Fn(&Parts) -> Scope + Send + Sync;
/// The fingerprint function's type.
pub(crate) type FingerprintFn = dyn Fn(&Parts, &Bytes) -> PayloadFingerprint + Send + Sync;
/// The stored-status predicate's type.
pub(crate) type StatusFn = dyn Fn(StatusCode) -> bool + Send + Sync;

/// What a covered request without a key gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum MissingKey {
    /// `400` (problem type `missing-key`), the draft's answer for an
    /// operation documented as requiring the header.
    #[default]
    Reject,
    /// Passed to the handler without any idempotency (keys optional).
    PassThrough,
}

/// What a request gets while another with its key is in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum InFlight {
    /// `409` (problem type `in-progress`) with `Retry-After`, at once.
    Reject {
        /// The `Retry-After` hint (whole seconds, at least 1).
        retry_after: Duration,
    },
    /// Wait up to `timeout` for the first request to finish: then the
    /// stored response is replayed (or, if the first was released, this
    /// request runs the handler). Still in flight after `timeout`: `409`.
    Wait {
        /// The longest wait.
        timeout: Duration,
        /// The `Retry-After` hint of a `409` after the wait.
        retry_after: Duration,
    },
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight::Reject {
            retry_after: Duration::from_secs(1),
        }
    }
}

/// What a request gets when the store cannot be reached (with the default
/// engine failure policy, a remote tier that is down).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnUnavailable {
    /// Fail closed: `503` (problem type `store-unavailable`) with
    /// `Retry-After`; the handler does not run.
    Reject {
        /// The `Retry-After` hint.
        retry_after: Duration,
    },
    /// Fail open: run the handler without a claim; nothing is stored, and
    /// a retry may run it again.
    Proceed,
}

impl Default for OnUnavailable {
    fn default() -> Self {
        OnUnavailable::Reject {
            retry_after: Duration::from_secs(1),
        }
    }
}

/// The statuses stored by default: every final status except 5xx (the
/// handler failed: a retry should run it again) and those that say "not
/// now" or "not you" rather than "done": 401, 403, 408, 409, 423, 425,
/// 429. A stored 4xx (a declined card, a validation error) is replayed as
/// it was, as a retry of the same request would get it anyway.
#[must_use]
pub fn default_stored_status(status: StatusCode) -> bool {
    let code = status.as_u16();
    (200..500).contains(&code) && !matches!(code, 401 | 403 | 408 | 409 | 423 | 425 | 429)
}

/// The headers replayed by default: those that describe the body or the
/// created resource. Never `Set-Cookie`, `Date`, or hop-by-hop headers.
pub const DEFAULT_REPLAY_HEADERS: [HeaderName; 6] = [
    header::CONTENT_TYPE,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LOCATION,
    header::LOCATION,
    header::ETAG,
];

/// The header that marks a replayed response (`Idempotent-Replayed: true`).
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The request header carrying the key.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

pub(crate) struct Config {
    pub methods: Vec<Method>,
    pub header: HeaderName,
    pub missing_key: MissingKey,
    pub syntax: KeySyntax,
    pub max_key_len: usize,
    pub scope: Option<Arc<ScopeFn>>,
    pub fingerprint: Arc<FingerprintFn>,
    pub stored_status: Arc<StatusFn>,
    pub replay_headers: Vec<HeaderName>,
    pub max_request_body: usize,
    pub max_response_body: usize,
    pub in_flight: InFlight,
    pub lease: Option<Duration>,
    pub on_unavailable: OnUnavailable,
    pub problem_base: String,
}

/// What the layer and every service it makes share.
pub(crate) struct Shared {
    pub config: Config,
    pub store: Store,
    pub stats: Arc<IdempotencyStats>,
}

/// A tower [`Layer`] that makes the wrapped service honour `Idempotency-Key`
/// (see the [crate docs](crate)). Cheap to clone: the store and the
/// counters are shared.
#[derive(Clone)]
pub struct IdempotencyLayer {
    shared: Arc<Shared>,
}

impl IdempotencyLayer {
    /// The layer with every default, claiming in `engine` (its window is
    /// how long responses are kept; its `max_result_bytes` bounds a stored
    /// response).
    ///
    /// # Panics
    /// Never with the defaults (they are valid).
    #[must_use]
    pub fn new(engine: Arc<Deduper>) -> Self {
        Self::builder(engine)
            .build()
            .expect("the defaults are valid")
    }

    /// A builder, claiming in `engine`.
    pub fn builder(engine: Arc<Deduper>) -> IdempotencyLayerBuilder {
        IdempotencyLayerBuilder {
            engine,
            methods: vec![Method::POST, Method::PATCH],
            header: IDEMPOTENCY_KEY,
            missing_key: MissingKey::default(),
            syntax: KeySyntax::default(),
            max_key_len: 255,
            scope: None,
            fingerprint: Arc::new(method_target_body),
            stored_status: Arc::new(default_stored_status),
            replay_headers: DEFAULT_REPLAY_HEADERS.to_vec(),
            max_request_body: 1 << 20,
            max_response_body: 64 << 10,
            in_flight: InFlight::default(),
            lease: None,
            on_unavailable: OnUnavailable::default(),
            problem_base: DEFAULT_PROBLEM_BASE.to_owned(),
            dispatch: Dispatch::Auto,
        }
    }

    /// The layer's counters (shared by every service it made).
    #[must_use]
    pub fn stats(&self) -> Arc<IdempotencyStats> {
        Arc::clone(&self.shared.stats)
    }

    /// The engine keys are claimed in.
    #[must_use]
    pub fn engine(&self) -> &Arc<Deduper> {
        self.shared.store.engine()
    }

    /// True when claims are engine calls on the request's own thread
    /// ([`Dispatch::Direct`], or [`Dispatch::Auto`] on a local tier).
    #[must_use]
    pub fn is_direct(&self) -> bool {
        self.shared.store.is_direct()
    }

    /// Publishes the layer's counters through the `metrics` facade
    /// (`tiered_dedup_http_requests_total{namespace, outcome}`,
    /// `tiered_dedup_http_handler_runs_total`,
    /// `tiered_dedup_http_stored_bytes_total`,
    /// `tiered_dedup_http_commit_retries_total`), then the engine's own
    /// series (`Deduper::publish_metrics`). Call it before each scrape or on
    /// an interval. (Feature `metrics`.)
    #[cfg(feature = "metrics")]
    pub fn publish_metrics(&self) {
        let engine = self.shared.store.engine();
        self.shared.stats.publish(&engine.sizing().namespace);
        engine.publish_metrics();
    }
}

impl<S> Layer<S> for IdempotencyLayer {
    type Service = Idempotency<S>;

    fn layer(&self, inner: S) -> Idempotency<S> {
        Idempotency::new(inner, Arc::clone(&self.shared))
    }
}

impl fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayer")
            .field("methods", &self.shared.config.methods)
            .field("store", &self.shared.store)
            .finish_non_exhaustive()
    }
}

/// The default problem type base: a tag URI (RFC 4151), a stable
/// identifier that is not a link. Point it at your API's docs with
/// [`IdempotencyLayerBuilder::problem_type_base`].
pub const DEFAULT_PROBLEM_BASE: &str = "tag:tiered-dedup,2026:idempotency/";

/// Builds an [`IdempotencyLayer`]; [`IdempotencyLayerBuilder::build`]
/// checks the settings.
#[must_use]
pub struct IdempotencyLayerBuilder {
    engine: Arc<Deduper>,
    methods: Vec<Method>,
    header: HeaderName,
    missing_key: MissingKey,
    syntax: KeySyntax,
    max_key_len: usize,
    scope: Option<Arc<ScopeFn>>,
    fingerprint: Arc<FingerprintFn>,
    stored_status: Arc<StatusFn>,
    replay_headers: Vec<HeaderName>,
    max_request_body: usize,
    max_response_body: usize,
    in_flight: InFlight,
    lease: Option<Duration>,
    on_unavailable: OnUnavailable,
    problem_base: String,
    dispatch: Dispatch,
}

/// A setting [`IdempotencyLayerBuilder::build`] refuses.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LayerConfigError {
    /// No method is covered.
    NoMethods,
    /// A safe method (GET, HEAD, OPTIONS, TRACE) is listed: they are
    /// idempotent already, and the draft is for the others.
    SafeMethod(Method),
    /// The key length limit is 0 or over 8 192.
    KeyLength(usize),
    /// A body cap of 0, or a response cap over 4 GiB.
    BodyCap(&'static str),
    /// A zero wait, lease or `Retry-After`.
    ZeroDuration(&'static str),
}

impl fmt::Display for LayerConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerConfigError::NoMethods => f.write_str("methods: list at least one (default: POST, PATCH)"),
            LayerConfigError::SafeMethod(m) => write!(
                f,
                "methods: {m} is safe (idempotent already); list only unsafe methods such as POST or PATCH"
            ),
            LayerConfigError::KeyLength(n) => {
                write!(f, "max_key_len: {n} is outside 1..=8192 (default 255)")
            }
            LayerConfigError::BodyCap(which) => {
                write!(f, "{which}: must be at least 1 byte and at most 4 GiB")
            }
            LayerConfigError::ZeroDuration(which) => write!(f, "{which}: must be longer than zero"),
        }
    }
}

impl std::error::Error for LayerConfigError {}

impl IdempotencyLayerBuilder {
    /// The methods that need a key. Default: `POST`, `PATCH`.
    pub fn methods(mut self, methods: impl IntoIterator<Item = Method>) -> Self {
        self.methods = methods.into_iter().collect();
        self
    }

    /// The request header carrying the key. Default: `Idempotency-Key`.
    pub fn header_name(mut self, name: HeaderName) -> Self {
        self.header = name;
        self
    }

    /// What a covered request without a key gets. Default:
    /// [`MissingKey::Reject`] (`400`).
    pub fn missing_key(mut self, policy: MissingKey) -> Self {
        self.missing_key = policy;
        self
    }

    /// Which spellings of a key are accepted. Default:
    /// [`KeySyntax::StructuredString`] (the draft's quoted sf-string).
    pub fn key_syntax(mut self, syntax: KeySyntax) -> Self {
        self.syntax = syntax;
        self
    }

    /// The longest key accepted, in characters (longer: `400`). Default:
    /// 255 (room for a UUID with a prefix; what payment APIs accept).
    pub fn max_key_len(mut self, len: usize) -> Self {
        self.max_key_len = len;
        self
    }

    /// The scope of a request's key, typically the authenticated principal
    /// or tenant put in the request's extensions by an authentication layer
    /// outside this one: keys of two scopes never meet, so a client cannot
    /// read another's stored response by guessing its key. Default: one
    /// global scope.
    pub fn scope<F>(mut self, scope: F) -> Self
    where
        F: Fn(&Parts) -> Scope + Send + Sync + 'static,
    {
        self.scope = Some(Arc::new(scope));
        self
    }

    /// What makes two requests with one key the same request (different:
    /// `422`). Given the request's head and its whole body. Default:
    /// [`crate::fingerprint::method_target_body`]; see also
    /// `fingerprint::canonical_json` and `fingerprint::json_fields`
    /// (feature `json`).
    pub fn fingerprint<F>(mut self, fingerprint: F) -> Self
    where
        F: Fn(&Parts, &Bytes) -> PayloadFingerprint + Send + Sync + 'static,
    {
        self.fingerprint = Arc::new(fingerprint);
        self
    }

    /// Which response statuses are stored and replayed; any other releases
    /// the key, so a retry runs the handler again. Default:
    /// [`default_stored_status`] (2xx, 3xx and 4xx except 401, 403, 408,
    /// 409, 423, 425, 429).
    pub fn stored_statuses<F>(mut self, stored: F) -> Self
    where
        F: Fn(StatusCode) -> bool + Send + Sync + 'static,
    {
        self.stored_status = Arc::new(stored);
        self
    }

    /// The response headers stored and replayed with the status and body
    /// (all values of each, in order). Default: [`DEFAULT_REPLAY_HEADERS`]
    /// (`Content-Type`, `Content-Encoding`, `Content-Language`,
    /// `Content-Location`, `Location`, `ETag`).
    pub fn replay_headers(mut self, headers: impl IntoIterator<Item = HeaderName>) -> Self {
        self.replay_headers = headers.into_iter().collect();
        self
    }

    /// The largest request body read to fingerprint it (larger: `413`,
    /// nothing claimed). Default: 1 MiB.
    pub fn max_request_body(mut self, bytes: usize) -> Self {
        self.max_request_body = bytes;
        self
    }

    /// The largest response body stored. A larger body is still sent to
    /// the client whole (streamed past the cap, never buffered beyond it),
    /// and the key completes without a replayable body: retries get `410`.
    /// The whole stored record (status, replayed headers, body) must also
    /// fit the engine's `max_result_bytes`, or the same happens. Default:
    /// 64 KiB.
    pub fn max_response_body(mut self, bytes: usize) -> Self {
        self.max_response_body = bytes;
        self
    }

    /// What a request gets while another with its key is in flight.
    /// Default: [`InFlight::Reject`], `Retry-After: 1`.
    pub fn in_flight(mut self, policy: InFlight) -> Self {
        self.in_flight = policy;
        self
    }

    /// How long a claim's lease lasts: a request whose handler runs longer
    /// can lose its key to a retry (its commit then stores nothing and
    /// counts `not_recorded`). Pick it above your request timeout. Default:
    /// the engine's `lease_duration` (30 s unless set).
    pub fn lease(mut self, duration: Duration) -> Self {
        self.lease = Some(duration);
        self
    }

    /// What a request gets when the store cannot be reached. Default:
    /// [`OnUnavailable::Reject`] (`503`, `Retry-After: 1`).
    pub fn on_unavailable(mut self, policy: OnUnavailable) -> Self {
        self.on_unavailable = policy;
        self
    }

    /// The prefix of the problem type URIs (each answer's
    /// [`crate::ProblemKind::slug`] is appended). Default:
    /// [`DEFAULT_PROBLEM_BASE`].
    pub fn problem_type_base(mut self, base: impl Into<String>) -> Self {
        self.problem_base = base.into();
        self
    }

    /// How claims reach the engine. Default: [`Dispatch::Auto`].
    pub fn dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = dispatch;
        self
    }

    /// The layer.
    ///
    /// # Errors
    /// [`LayerConfigError`] naming the setting to change.
    pub fn build(self) -> Result<IdempotencyLayer, LayerConfigError> {
        if self.methods.is_empty() {
            return Err(LayerConfigError::NoMethods);
        }
        if let Some(m) = self.methods.iter().find(|m| m.is_safe()) {
            return Err(LayerConfigError::SafeMethod(m.clone()));
        }
        if self.max_key_len == 0 || self.max_key_len > 8192 {
            return Err(LayerConfigError::KeyLength(self.max_key_len));
        }
        if self.max_request_body == 0 {
            return Err(LayerConfigError::BodyCap("max_request_body"));
        }
        if self.max_response_body == 0 || self.max_response_body > u32::MAX as usize {
            return Err(LayerConfigError::BodyCap("max_response_body"));
        }
        let waits = match self.in_flight {
            InFlight::Reject { retry_after } if retry_after.is_zero() => {
                return Err(LayerConfigError::ZeroDuration("in_flight retry_after"))
            }
            InFlight::Wait { timeout, .. } if timeout.is_zero() => {
                return Err(LayerConfigError::ZeroDuration("in_flight timeout"))
            }
            InFlight::Wait { retry_after, .. } if retry_after.is_zero() => {
                return Err(LayerConfigError::ZeroDuration("in_flight retry_after"))
            }
            InFlight::Reject { .. } => false,
            InFlight::Wait { .. } => true,
        };
        if matches!(self.on_unavailable, OnUnavailable::Reject { retry_after } if retry_after.is_zero())
        {
            return Err(LayerConfigError::ZeroDuration("on_unavailable retry_after"));
        }
        if self.lease.is_some_and(|l| l.is_zero()) {
            return Err(LayerConfigError::ZeroDuration("lease"));
        }
        let retry_for = self.lease.unwrap_or(Duration::from_secs(30));
        let store = Store::new(self.engine, self.dispatch, waits, retry_for);
        Ok(IdempotencyLayer {
            shared: Arc::new(Shared {
                config: Config {
                    methods: self.methods,
                    header: self.header,
                    missing_key: self.missing_key,
                    syntax: self.syntax,
                    max_key_len: self.max_key_len,
                    scope: self.scope,
                    fingerprint: self.fingerprint,
                    stored_status: self.stored_status,
                    replay_headers: self.replay_headers,
                    max_request_body: self.max_request_body,
                    max_response_body: self.max_response_body,
                    in_flight: self.in_flight,
                    lease: self.lease,
                    on_unavailable: self.on_unavailable,
                    problem_base: self.problem_base,
                },
                store,
                stats: Arc::new(IdempotencyStats::default()),
            }),
        })
    }
}

impl fmt::Debug for IdempotencyLayerBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdempotencyLayerBuilder")
            .field("methods", &self.methods)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_statuses() {
        for (code, stored) in [
            (200, true),
            (201, true),
            (303, true),
            (400, true),
            (402, true),
            (404, true),
            (422, true),
            (401, false),
            (403, false),
            (408, false),
            (409, false),
            (429, false),
            (500, false),
            (503, false),
            (101, false),
        ] {
            assert_eq!(
                default_stored_status(StatusCode::from_u16(code).unwrap()),
                stored,
                "{code}"
            );
        }
    }

    #[test]
    fn the_builder_refuses_bad_settings() {
        let engine = Arc::new(Deduper::builder().build().unwrap());
        let b = || IdempotencyLayer::builder(Arc::clone(&engine));
        assert_eq!(
            b().methods([]).build().unwrap_err(),
            LayerConfigError::NoMethods
        );
        assert_eq!(
            b().methods([Method::POST, Method::GET])
                .build()
                .unwrap_err(),
            LayerConfigError::SafeMethod(Method::GET)
        );
        assert_eq!(
            b().max_key_len(0).build().unwrap_err(),
            LayerConfigError::KeyLength(0)
        );
        assert!(b().max_request_body(0).build().is_err());
        assert!(b()
            .in_flight(InFlight::Wait {
                timeout: Duration::ZERO,
                retry_after: Duration::from_secs(1)
            })
            .build()
            .is_err());
        assert!(b().lease(Duration::ZERO).build().is_err());
        assert!(b().methods([Method::PUT, Method::DELETE]).build().is_ok());
        assert!(IdempotencyLayer::new(Arc::clone(&engine)).is_direct());
    }
}
