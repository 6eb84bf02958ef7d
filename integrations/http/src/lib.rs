//! HTTP idempotency keys for any tower service — axum, hyper, tonic — as
//! the IETF draft *The Idempotency-Key HTTP Header Field*
//! (draft-ietf-httpapi-idempotency-key-header) describes them, built on
//! [`tiered_dedup`]'s claims: one handler run per key, however many
//! retries arrive and whichever replica they reach.
//!
//! ```no_run
//! use std::sync::Arc;
//! use axum::{routing::post, Router};
//! use tiered_dedup::Deduper;
//! use tiered_dedup_http::IdempotencyLayer;
//!
//! # async fn create_payment() -> &'static str { "" }
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let engine = Arc::new(Deduper::builder().window(std::time::Duration::from_secs(24 * 3600)).build()?);
//! let app = Router::new()
//!     .route("/payments", post(create_payment))
//!     .layer(IdempotencyLayer::new(engine)); // the one line
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8080").await?;
//! axum::serve(listener, app).await?;
//! # Ok(()) }
//! ```
//!
//! # What a request gets
//!
//! On the covered methods (default `POST` and `PATCH`; others pass through
//! untouched):
//!
//! | request | answer | handler runs? |
//! |---|---|---|
//! | first with its key | the handler's response (stored if its status is stored: see below) | yes, once |
//! | retry after the first completed | the stored response, byte for byte, plus `Idempotent-Replayed: true` | no |
//! | retry while the first is in flight | `409` problem, `Retry-After`; or, with [`InFlight::Wait`], the first one's response once it is stored | no |
//! | same key, different request (method, target or body by default) | `422` problem | no |
//! | no `Idempotency-Key` | `400` problem (or passthrough with [`MissingKey::PassThrough`]) | no |
//! | malformed key (not an sf-string, empty, over 255 characters, repeated header) | `400` problem | no |
//! | request body over the cap (1 MiB) | `413` problem | no |
//! | the first ended in a status that is not stored (5xx, 401, 403, 408, 409, 423, 425, 429), failed, panicked, or its client went away | the key is released: a retry runs the handler again | — |
//! | retry of a key whose response body was over the cap (64 KiB) | `410` problem (the operation was done; its response cannot be replayed) | no |
//! | the store is unreachable | `503` problem, `Retry-After` (fail closed; or [`OnUnavailable::Proceed`]) | no |
//!
//! Every problem is `application/problem+json` (RFC 9457) with a `type`
//! of the [`ProblemKind`]. Keys are scoped ([`IdempotencyLayerBuilder::scope`]):
//! the scope is part of the claimed key, so one principal never reads
//! another's stored response.
//!
//! # Stores
//!
//! The layer claims in a [`tiered_dedup::Deduper`]; its exact tier is the
//! store. The memory tier keeps keys in this process (a restart forgets
//! them); the Redis tier (feature `redis` of `tiered-dedup`, with
//! [`tiered_dedup::Affinity::Shared`] when replicas behind a load balancer
//! share it) survives restarts and serves every replica. On a remote tier,
//! claims, commits and releases go through a [`tiered_dedup::ClaimBatcher`]
//! ([`Dispatch::Auto`]): never I/O on a runtime worker thread, and
//! concurrent requests share round trips. The engine's window is how long a
//! response is kept; its `max_result_bytes` bounds a stored record.
//!
//! A crash between the handler's effect and the commit (the process killed
//! mid-request) leaves the key's lease to expire: the next retry after it
//! runs the handler again. Only an effect stored in the same transaction as
//! the claim is exactly once; the layer gives at-most-once per lease and
//! exactly-once replay of whatever was committed.
//!
//! More: `docs/http.md` (semantics, configuration, what a client does with
//! each answer).

mod body;
pub mod fingerprint;
mod key;
mod keyed;
mod layer;
mod problem;
mod record;
mod service;
mod stats;
mod store;

pub use body::{BoxError, RequestBody, ResponseBody};
pub use fingerprint::Scope;
pub use key::{parse_key, KeyError, KeySyntax};
pub use layer::{
    default_stored_status, IdempotencyLayer, IdempotencyLayerBuilder, InFlight, LayerConfigError,
    MissingKey, OnUnavailable, DEFAULT_PROBLEM_BASE, DEFAULT_REPLAY_HEADERS, IDEMPOTENCY_KEY,
    IDEMPOTENT_REPLAYED,
};
pub use problem::ProblemKind;
pub use record::{RecordError, StoredBody, StoredResponse, RECORD_VERSION};
pub use service::{Idempotency, ResponseFuture};
pub use stats::{IdempotencyStats, Outcome};
pub use store::Dispatch;
