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

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body::Body;
use http_body_util::BodyExt;
use pin_project_lite::pin_project;
use tiered_dedup::claims::SharedLease;
use tiered_dedup::{Claim, ClaimRequest, CommitError, Fingerprint};
use tower_service::Service;

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::fingerprint::{with_claim_key, Scope};
use crate::key::{parse_key_in, KeyError};
use crate::layer::{InFlight, MissingKey, OnUnavailable, Shared, IDEMPOTENT_REPLAYED};
use crate::problem::{Problem, ProblemKind};
use crate::record::{encode_record, StoredBody, StoredResponse};
use crate::stats::{IdempotencyStats, Outcome};

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
        let request = Request::from_parts(parts, body);
        // The service polled ready is the one that must be called: take it,
        // leave a clone for the next request.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        ResponseFuture {
            kind: FutureKind::Claimed {
                future: Box::pin(claimed(Arc::clone(shared), inner, request, fp)),
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
fn answer<B>(shared: &Shared, outcome: Outcome, problem: Problem) -> Response<ResponseBody<B>> {
    shared.stats.record(outcome);
    problem
        .into_response(&shared.config.problem_base)
        .map(ResponseBody::full)
}

/// Why a request body was not read whole.
enum ReadError {
    TooLarge,
    Failed(BoxError),
}

/// The whole body, or [`ReadError::TooLarge`] as soon as it passes `cap`
/// (never buffering more than `cap` plus one frame).
async fn read_body<B>(body: B, cap: usize) -> Result<Bytes, ReadError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > cap as u64 {
        return Err(ReadError::TooLarge);
    }
    let mut body = std::pin::pin!(body);
    let mut gathered = Gathered::default();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ReadError::Failed(e.into()))?;
        if let Ok(data) = frame.into_data() {
            if gathered.len() + data.len() > cap {
                return Err(ReadError::TooLarge);
            }
            gathered.push(data);
        }
    }
    Ok(gathered.finish())
}

/// Data frames gathered into one `Bytes`: a single frame (the usual case)
/// is kept as it is, without a copy.
#[derive(Default)]
struct Gathered {
    first: Option<Bytes>,
    more: BytesMut,
}

impl Gathered {
    fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.more.len()
    }

    fn push(&mut self, data: Bytes) {
        match self.first.take() {
            None if self.more.is_empty() => self.first = Some(data),
            None => self.more.extend_from_slice(&data),
            Some(first) => {
                self.more.reserve(first.len() + data.len());
                self.more.extend_from_slice(&first);
                self.more.extend_from_slice(&data);
            }
        }
    }

    fn finish(self) -> Bytes {
        match self.first {
            Some(first) => first,
            None => self.more.freeze(),
        }
    }
}

/// A request whose key's fingerprint (in its scope) is `fp`: read, claim,
/// then act or answer.
async fn claimed<S, ReqB, ResB>(
    shared: Arc<Shared>,
    inner: S,
    request: Request<ReqB>,
    fp: Fingerprint,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ReqB: Body<Data = Bytes>,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let config = &shared.config;
    let (parts, body) = request.into_parts();
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let too_large = || {
        Problem::new(
            ProblemKind::RequestTooLarge,
            format!(
                "requests with an idempotency key may carry at most {} bytes of body (it is read whole to fingerprint it)",
                config.max_request_body
            ),
        )
    };
    if declared.is_some_and(|n| n > config.max_request_body as u64) {
        return Ok(answer(&shared, Outcome::RequestTooLarge, too_large()));
    }
    let body = match read_body(body, config.max_request_body).await {
        Ok(body) => body,
        Err(ReadError::TooLarge) => {
            return Ok(answer(&shared, Outcome::RequestTooLarge, too_large()))
        }
        Err(ReadError::Failed(e)) => {
            let problem = Problem::new(
                ProblemKind::UnreadableBody,
                format!("the request body could not be read: {e}"),
            );
            return Ok(answer(&shared, Outcome::UnreadableBody, problem));
        }
    };
    let mut claim = ClaimRequest::new(fp).payload((config.fingerprint)(&parts, &body));
    if let Some(lease) = config.lease {
        claim = claim.lease(lease);
    }
    let (wait, retry_after) = match config.in_flight {
        InFlight::Reject { retry_after } => (None, retry_after),
        InFlight::Wait {
            timeout,
            retry_after,
        } => (Some(timeout), retry_after),
    };
    match shared.store.claim(claim, wait).await {
        Claim::Acquired(lease) => {
            act(shared, inner, Request::from_parts(parts, body), Some(lease)).await
        }
        Claim::Completed { result, .. } => Ok(replay(&shared, result)),
        Claim::InProgress { .. } => {
            let problem = Problem::new(
                ProblemKind::InProgress,
                "a request with this idempotency key is being processed; retry after the Retry-After delay to get its response",
            )
            .retry_after(retry_after);
            Ok(answer(&shared, Outcome::InProgress, problem))
        }
        Claim::Conflict => {
            let problem = Problem::new(
                ProblemKind::KeyReused,
                "this idempotency key was used for a different request (method, target or body); use a new key for a new operation",
            );
            Ok(answer(&shared, Outcome::KeyReused, problem))
        }
        Claim::Unavailable | Claim::Late { .. } => match config.on_unavailable {
            OnUnavailable::Reject { retry_after } => {
                let problem = Problem::new(
                    ProblemKind::StoreUnavailable,
                    "the idempotency store cannot be reached; nothing was done, retry with the same key",
                )
                .retry_after(retry_after);
                Ok(answer(&shared, Outcome::Unavailable, problem))
            }
            OnUnavailable::Proceed => {
                shared.stats.record(Outcome::Unprotected);
                act(shared, inner, Request::from_parts(parts, body), None).await
            }
        },
    }
}

/// A lease held while the handler runs: dropped with the request (the
/// client went away, the handler panicked), it is released and counted.
struct Held {
    lease: Option<SharedLease>,
    stats: Arc<IdempotencyStats>,
}

impl Drop for Held {
    fn drop(&mut self) {
        if self.lease.is_some() {
            self.stats.record(Outcome::Cancelled);
        }
    }
}

/// Runs the handler under `lease` (or none: unprotected), then stores or
/// releases.
async fn act<S, ReqB, ResB>(
    shared: Arc<Shared>,
    mut inner: S,
    request: Request<Bytes>,
    lease: Option<SharedLease>,
) -> Result<Response<ResponseBody<ResB>>, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let mut held = Held {
        lease,
        stats: Arc::clone(&shared.stats),
    };
    shared.stats.handler_ran();
    let result = inner.call(request.map(RequestBody::buffered)).await;
    let Some(lease) = held.lease.take() else {
        return result.map(|r| r.map(ResponseBody::inner));
    };
    let store = &shared.store;
    let config = &shared.config;
    let response = match result {
        Ok(response) => response,
        Err(e) => {
            let _ = store.release(lease).await;
            shared.stats.record(Outcome::Released);
            return Err(e);
        }
    };
    if !(config.stored_status)(response.status()) {
        let _ = store.release(lease).await;
        shared.stats.record(Outcome::Released);
        return Ok(response.map(ResponseBody::inner));
    }
    let (head, body) = response.into_parts();
    // Encoded straight from the response's headers when the body is read.
    let replayed = replayable(&config.replay_headers, &head.headers);
    let encode = |body: Option<&[u8]>| encode_record(head.status, || replayed.iter(), body);
    // The lease is held again while the body is read: a request dropped now
    // releases it.
    held.lease = Some(lease);
    let mut body = Box::pin(body);
    let mut buf = Gathered::default();
    let mut trailers = None;
    loop {
        // The handler's error type need not be `Send`: boxed at once.
        let next = body
            .frame()
            .await
            .map(|frame| frame.map_err(Into::<BoxError>::into));
        match next {
            None => break,
            Some(Err(error)) => {
                let lease = held.lease.take().expect("held");
                let _ = store.release(lease).await;
                shared.stats.record(Outcome::Released);
                let body = ResponseBody::failed(buf.finish(), error);
                return Ok(Response::from_parts(head, body));
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if buf.len() + data.len() > config.max_response_body => {
                    // Over the cap: the key completes without a body; the
                    // client gets what was read, then the rest as it comes.
                    let lease = held.lease.take().expect("held");
                    let outcome = commit_omitted(&shared, lease, &encode).await;
                    shared.stats.record(outcome);
                    buf.push(data);
                    let spilled = ResponseBody::spill(buf.finish(), body);
                    return Ok(Response::from_parts(head, spilled));
                }
                Ok(data) => buf.push(data),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            },
        }
    }
    let lease = held.lease.take().expect("held");
    let bytes = buf.finish();
    let encoded = encode(Some(&bytes));
    let len = encoded.len();
    let outcome = match store.commit(lease, encoded).await {
        Ok(()) => {
            shared.stats.stored(len);
            Outcome::Stored
        }
        Err(CommitError::ResultTooLarge { lease, .. }) => {
            commit_omitted(&shared, lease, &encode).await
        }
        Err(CommitError::LeaseLost(_)) => Outcome::NotRecorded,
        Err(CommitError::Unavailable { lease, .. }) => {
            store.retry_commit(lease, encode(Some(&bytes)), &shared.stats);
            Outcome::NotRecorded
        }
    };
    shared.stats.record(outcome);
    Ok(Response::from_parts(
        head,
        ResponseBody::full_with_trailers(bytes, trailers),
    ))
}

/// Replayable headers found without allocating: a response has a handful.
const INLINE_HEADERS: usize = 8;

/// The replayable headers of a response, borrowed from it, in the order
/// they are stored: by their name's rank in the configured list, the
/// values of one name in the response's order.
struct Replayable<'h> {
    inline: [Option<(usize, &'h HeaderName, &'h HeaderValue)>; INLINE_HEADERS],
    len: usize,
    /// All of them, once there are more than fit inline.
    spilled: Vec<(usize, &'h HeaderName, &'h HeaderValue)>,
}

impl<'h> Replayable<'h> {
    fn iter(&self) -> impl Iterator<Item = (&'h HeaderName, &'h HeaderValue)> + '_ {
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
fn replayable<'h>(names: &[HeaderName], headers: &'h HeaderMap) -> Replayable<'h> {
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

/// Completes the key with the response's status and headers but no body
/// (`encode(None)`).
async fn commit_omitted(
    shared: &Shared,
    lease: SharedLease,
    encode: &impl Fn(Option<&[u8]>) -> Vec<u8>,
) -> Outcome {
    let omitted = encode(None);
    let len = omitted.len();
    match shared.store.commit(lease, omitted).await {
        Ok(()) => {
            shared.stats.stored(len);
            Outcome::StoredWithoutBody
        }
        Err(CommitError::Unavailable { lease, .. }) => {
            shared
                .store
                .retry_commit(lease, encode(None), &shared.stats);
            Outcome::NotRecorded
        }
        // Even the bodiless record is over the engine's cap, or the lease
        // is lost: nothing stored (a retry runs the handler again).
        Err(_) => Outcome::NotRecorded,
    }
}

/// The stored response, or `410` when there is none to replay.
fn replay<B>(shared: &Shared, result: Arc<[u8]>) -> Response<ResponseBody<B>> {
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
