//! [`Idempotency`]: the service the layer wraps around a handler, and the
//! life of one request with a key.
//!
//! ```text
//! covered method? ──no──▶ handler (passthrough)
//!   │ yes
//! key header ──missing──▶ 400 missing-key (or passthrough)   ──malformed──▶ 400 invalid-key
//!   │
//! read body ≤ cap ──over──▶ 413      ──error──▶ 400 unreadable-body
//!   │
//! claim (scope, key) with the payload fingerprint
//!   ├─ Acquired   ─▶ handler ─▶ stored status? ─yes─▶ read body ≤ cap ─▶ commit record ─▶ response
//!   │                   │                          │              └ over cap: commit "no body", stream the rest
//!   │                   │                          └─no─▶ release ─▶ response
//!   │                   └ error / dropped (client gone, panic) ─▶ release
//!   ├─ Completed  ─▶ stored response + Idempotent-Replayed: true (or 410 without a body)
//!   ├─ InProgress ─▶ 409 + Retry-After (or, configured, wait for the first one)
//!   ├─ Conflict   ─▶ 422
//!   └─ Unavailable ─▶ 503 + Retry-After (or, configured, run unprotected)
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tower_service::Service;

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::fingerprint::{with_claim_key, Scope};
use crate::key::{parse_key_in, KeyError};
use crate::keyed::{too_large, Keyed};
use crate::layer::{MissingKey, Shared, IDEMPOTENT_REPLAYED};
use crate::problem::{Problem, ProblemKind};
use crate::record::{StoredBody, StoredResponse};
use crate::stats::Outcome;

/// The service [`crate::IdempotencyLayer`] makes: `S` with
/// `Idempotency-Key` semantics on the covered methods.
pub struct Idempotency<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Idempotency<S> {
    pub(crate) fn new(inner: S, shared: Arc<Shared>) -> Self {
        Idempotency { inner, shared }
    }

    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The wrapped service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The wrapped service, consuming `self`.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: Clone> Clone for Idempotency<S> {
    fn clone(&self) -> Self {
        Idempotency {
            inner: self.inner.clone(),
            shared: Arc::clone(&self.shared),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for Idempotency<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Idempotency")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

type BoxedResponse<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

pin_project! {
    /// The future of [`Idempotency`]'s response.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: FutureKind<F, B, E>,
    }
}

pin_project! {
    #[project = FutureKindProj]
    enum FutureKind<F, B, E> {
        Passthrough { #[pin] future: F },
        Ready { response: Option<Response<ResponseBody<B>>> },
        Claimed { future: BoxedResponse<B, E> },
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            FutureKindProj::Passthrough { future } => future
                .poll(cx)
                .map(|r| r.map(|response| response.map(ResponseBody::inner))),
            FutureKindProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("polled after completion")))
            }
            FutureKindProj::Claimed { future } => future.as_mut().poll(cx),
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<S, ReqB, ResB> Service<Request<ReqB>> for Idempotency<S>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ReqB: Body<Data = Bytes> + Send + 'static,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ResponseBody<ResB>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, ResB, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqB>) -> Self::Future {
        let shared = &self.shared;
        let config = &shared.config;
        let passthrough = |inner: &mut S, request: Request<ReqB>| {
            shared.stats.record(Outcome::Passthrough);
            ResponseFuture {
                kind: FutureKind::Passthrough {
                    future: inner.call(request.map(RequestBody::streaming)),
                },
            }
        };
        if !config.methods.contains(request.method()) {
            return passthrough(&mut self.inner, request);
        }
        // Taken apart once: the key is read from the headers in place
        // (borrowed, not copied) and the scope sees the parts.
        let (parts, body) = request.into_parts();
        let mut values = parts.headers.get_all(&config.header).iter();
        let parsed = match (values.next(), values.next()) {
            (None, _) => match config.missing_key {
                MissingKey::PassThrough => {
                    return passthrough(&mut self.inner, Request::from_parts(parts, body))
                }
                MissingKey::Reject => Err(Problem::new(
                    ProblemKind::MissingKey,
                    format!(
                        "{} {} requires an {} request header: a unique structured-field string per operation, e.g. {}: \"8e03978e-40d5-43e8-bc93-6894a57f9324\"",
                        parts.method,
                        parts.uri.path(),
                        header_display(&config.header),
                        header_display(&config.header),
                    ),
                )),
            },
            (Some(_), Some(_)) => Err(invalid_key(&config.header, &KeyError::Repeated)),
            (Some(value), None) => {
                parse_key_in(value.as_bytes(), config.syntax, config.max_key_len)
                    .map_err(|e| invalid_key(&config.header, &e))
            }
        };
        let key = match parsed {
            Ok(key) => key,
            Err(problem) => {
                let outcome = match problem.kind {
                    ProblemKind::MissingKey => Outcome::MissingKey,
                    _ => Outcome::InvalidKey,
                };
                return ResponseFuture {
                    kind: FutureKind::Ready {
                        response: Some(answer(shared, outcome, problem)),
                    },
                };
            }
        };
        // The key's fingerprint in its scope, here rather than in the
        // request's future: the key is not kept.
        let scope = config
            .scope
            .as_ref()
            .map_or_else(Scope::global, |f| f(&parts));
        let fp = with_claim_key(&scope, &key, |k| shared.store.fingerprint(k));
        // A body declared or known to be over the cap is refused before any
        // of it is read.
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let cap = config.max_request_body as u64;
        if declared.is_some_and(|n| n > cap) || body.size_hint().lower() > cap {
            return ResponseFuture {
                kind: FutureKind::Ready {
                    response: Some(answer(shared, Outcome::RequestTooLarge, too_large(shared))),
                },
            };
        }
        // The service polled ready is the one that must be called: take it,
        // leave a clone for the next request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            kind: FutureKind::Claimed {
                future: Box::pin(Keyed::new(Arc::clone(shared), inner, parts, body, fp)),
            },
        }
    }
}

fn invalid_key(header: &http::HeaderName, e: &KeyError) -> Problem {
    Problem::new(
        ProblemKind::InvalidKey,
        format!("{}: {e}", header_display(header)),
    )
}

/// The header's name as the draft spells it (names are stored lowercase).
fn header_display(header: &http::HeaderName) -> &str {
    if *header == crate::layer::IDEMPOTENCY_KEY {
        "Idempotency-Key"
    } else {
        header.as_str()
    }
}

/// A problem response, counted as `outcome`.
pub(crate) fn answer<B>(
    shared: &Shared,
    outcome: Outcome,
    problem: Problem,
) -> Response<ResponseBody<B>> {
    shared.stats.record(outcome);
    problem
        .into_response(&shared.config.problem_base)
        .map(ResponseBody::full)
}

/// Replayable headers found without allocating: a response has a handful.
const INLINE_HEADERS: usize = 8;

/// The replayable headers of a response, borrowed from it, in the order
/// they are stored: by their name's rank in the configured list, the
/// values of one name in the response's order.
pub(crate) struct Replayable<'h> {
    inline: [Option<(usize, &'h HeaderName, &'h HeaderValue)>; INLINE_HEADERS],
    len: usize,
    /// All of them, once there are more than fit inline.
    spilled: Vec<(usize, &'h HeaderName, &'h HeaderValue)>,
}

impl<'h> Replayable<'h> {
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&'h HeaderName, &'h HeaderValue)> + '_ {
        let inline = self.inline[..self.len].iter().flatten();
        inline
            .chain(&self.spilled)
            .map(|&(_, name, value)| (name, value))
    }
}

/// The response's headers named in `names`: one pass over the response's
/// headers (a handful), ranked by the first position of their name in
/// `names`, then kept in rank order (stable: the values of one name keep
/// their order). No hashing, no copies.
pub(crate) fn replayable<'h>(names: &[HeaderName], headers: &'h HeaderMap) -> Replayable<'h> {
    let mut found = Replayable {
        inline: [None; INLINE_HEADERS],
        len: 0,
        spilled: Vec::new(),
    };
    for (name, value) in headers {
        let Some(rank) = names.iter().position(|n| n == name) else {
            continue;
        };
        let item = (rank, name, value);
        if found.spilled.is_empty() && found.len < INLINE_HEADERS {
            // Inserted after every header of a rank up to its own.
            let at = found.inline[..found.len]
                .iter()
                .flatten()
                .take_while(|(r, ..)| *r <= rank)
                .count();
            found.inline.copy_within(at..found.len, at + 1);
            found.inline[at] = Some(item);
            found.len += 1;
        } else {
            if found.spilled.is_empty() {
                found.spilled.extend(found.inline.iter().flatten());
                found.len = 0;
            }
            found.spilled.push(item);
        }
    }
    found.spilled.sort_by_key(|&(rank, ..)| rank);
    found
}

/// The stored response, or `410` when there is none to replay.
pub(crate) fn replay<B>(shared: &Shared, result: Arc<[u8]>) -> Response<ResponseBody<B>> {
    match StoredResponse::decode(result) {
        Ok(StoredResponse {
            status,
            headers,
            body: StoredBody::Bytes(body),
        }) => {
            shared.stats.record(Outcome::Replayed);
            let mut response = Response::new(ResponseBody::full(body));
            *response.status_mut() = status;
            let map = response.headers_mut();
            for (name, value) in headers {
                map.append(name, value);
            }
            map.insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
            response
        }
        Ok(StoredResponse { status, .. }) => {
            let problem = Problem::new(
                ProblemKind::ResponseNotStored,
                format!(
                    "the request with this idempotency key was processed (status {}), but its response body was over the replay cap and was not stored; do not repeat the operation, look its result up instead",
                    status.as_u16()
                ),
            )
            .extension("first_status", status.as_u16().to_string());
            answer(shared, Outcome::NotReplayable, problem)
        }
        Err(e) => {
            let problem = Problem::new(
                ProblemKind::ResponseNotStored,
                format!("the request with this idempotency key was processed, but {e}; do not repeat the operation"),
            );
            answer(shared, Outcome::NotReplayable, problem)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replayable_headers_follow_the_configured_order_and_keep_repeats() {
        let names = [header::CONTENT_TYPE, header::ETAG, header::LINK];
        let mut headers = HeaderMap::new();
        headers.append(header::LINK, HeaderValue::from_static("<a>"));
        headers.append(header::SET_COOKIE, HeaderValue::from_static("s=1"));
        headers.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        headers.append(header::LINK, HeaderValue::from_static("<b>"));
        headers.append(header::ETAG, HeaderValue::from_static("\"e\""));
        let got: Vec<(String, String)> = replayable(&names, &headers)
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect();
        let want = [
            ("content-type", "text/plain"),
            ("etag", "\"e\""),
            ("link", "<a>"),
            ("link", "<b>"),
        ];
        assert_eq!(
            got,
            want.map(|(n, v)| (n.to_owned(), v.to_owned())).to_vec()
        );
        assert_eq!(replayable(&[], &headers).iter().count(), 0);
        // A name listed twice counts once.
        let twice = [header::ETAG, header::ETAG];
        assert_eq!(replayable(&twice, &headers).iter().count(), 1);
    }

    #[test]
    fn replayable_headers_match_a_stable_sort_inline_and_spilled() {
        // The reference: every named header, stably sorted by the first
        // position of its name.
        fn reference(names: &[HeaderName], headers: &HeaderMap) -> Vec<(String, String)> {
            let rank = |name: &HeaderName| names.iter().position(|n| n == name);
            let mut found: Vec<_> = headers
                .iter()
                .filter(|(name, _)| rank(name).is_some())
                .collect();
            found.sort_by_key(|(name, _)| rank(name));
            found
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                .collect()
        }
        let pool = [
            header::CONTENT_TYPE,
            header::ETAG,
            header::LINK,
            header::LOCATION,
            header::SET_COOKIE,
            HeaderName::from_static("x-a"),
        ];
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n) as usize
        };
        let mut spilled = 0;
        for _ in 0..2000 {
            let mut headers = HeaderMap::new();
            // Up to 20 values: past 8 named ones the list spills.
            for i in 0..next(21) {
                let name = pool[next(pool.len() as u64)].clone();
                headers.append(name, HeaderValue::from_str(&format!("v{i}")).unwrap());
            }
            let names: Vec<HeaderName> = (0..next(6))
                .map(|_| pool[next(pool.len() as u64)].clone())
                .collect();
            let found = replayable(&names, &headers);
            spilled += usize::from(!found.spilled.is_empty());
            let got: Vec<(String, String)> = found
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
                .collect();
            assert_eq!(got, reference(&names, &headers), "names {names:?}");
        }
        assert!(spilled > 100, "the spilled path ran {spilled} times");
    }
}
