//! [`Keyed`]: the future of one request with a key, written out as a state
//! machine — read the body, claim, run the handler, read its response,
//! store or release:
//!
//! ```text
//! Reading ──claim (direct: now)──┬─ Acquired ─▶ Calling ─▶ Storing ─▶ commit ─▶ response
//!   │                            │                 │          └ over cap / error ─▶ commit "no body" / release
//!   └ batched, or waiting ─▶ Claiming              └ error, unstored status ─▶ release
//!                                ├─ Completed / InProgress / Conflict / Unavailable ─▶ an answer
//! a batched store's commit or release ─▶ Settling ─▶ response
//! ```
//!
//! Each state holds only what it needs. The same steps as two `async fn`s
//! made a future of 2 736 bytes (the compiler keeps every moved-from local
//! and argument for the whole life of the future), boxed per request: a
//! glibc large allocation and its copy on every request. This one is a
//! few hundred bytes.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{request, response, HeaderMap, Request, Response};
use http_body::Body;
use pin_project_lite::pin_project;
use tiered_dedup::claims::SharedLease;
use tiered_dedup::{Claim, ClaimRequest, CommitError, Deduper, Fingerprint};
use tower_service::Service;

use crate::body::{BoxError, RequestBody, ResponseBody};
use crate::layer::{InFlight, OnUnavailable, Shared};
use crate::problem::{Problem, ProblemKind};
use crate::record::encode_record;
use crate::service::{answer, replay, replayable};
use crate::stats::{IdempotencyStats, Outcome};

type Boxed<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type Answer<B, E> = Result<Response<ResponseBody<B>>, E>;

pin_project! {
    /// A request whose key's fingerprint (in its scope) is `fp`: read,
    /// claim, then act or answer.
    pub(crate) struct Keyed<S, ReqB, ResB>
    where
        S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    {
        shared: Arc<Shared>,
        // Taken when the handler is called.
        inner: Option<S>,
        fp: Fingerprint,
        #[pin]
        step: Step<S::Future, ReqB, ResB, S::Error>,
    }
}

pin_project! {
    #[project = StepProj]
    enum Step<F, ReqB, ResB, E> {
        // The request body, read whole (up to the cap) to fingerprint it.
        Reading {
            #[pin]
            body: ReqB,
            parts: Option<request::Parts>,
            gathered: Gathered,
        },
        // A claim through the batcher (a remote tier, or a wait for an
        // in-flight holder).
        Claiming {
            claim: Boxed<Claim<Arc<Deduper>>>,
            parts: Option<request::Parts>,
            body: Bytes,
        },
        // The handler runs, under the lease in `held` (none: unprotected).
        Calling {
            #[pin]
            future: F,
            held: Option<Held>,
        },
        // The handler's response body, read to be stored.
        Storing {
            head: Option<response::Parts>,
            body: Option<Pin<Box<ResB>>>,
            buf: Gathered,
            trailers: Option<HeaderMap>,
            held: Option<Held>,
        },
        // A batched store's commit or release, then `output`.
        Settling {
            settle: Boxed<()>,
            output: Option<Answer<ResB, E>>,
        },
        Done,
    }
}

/// What a step leads to: another step, or the answer.
enum Next<F, ReqB, ResB, E> {
    Step(Step<F, ReqB, ResB, E>),
    Ready(Answer<ResB, E>),
}

impl<S, ReqB, ResB> Keyed<S, ReqB, ResB>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
{
    /// The request (`parts`, `body`) with the key `fp`, to be run by
    /// `inner`. The body's declared size is checked by the caller.
    pub(crate) fn new(
        shared: Arc<Shared>,
        inner: S,
        parts: request::Parts,
        body: ReqB,
        fp: Fingerprint,
    ) -> Self {
        Keyed {
            shared,
            inner: Some(inner),
            fp,
            step: Step::Reading {
                body,
                parts: Some(parts),
                gathered: Gathered::default(),
            },
        }
    }
}

impl<S, ReqB, ResB> Future for Keyed<S, ReqB, ResB>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
    ReqB: Body<Data = Bytes>,
    ReqB::Error: Into<BoxError>,
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
    S::Error: Send + 'static,
{
    type Output = Answer<ResB, S::Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        let shared: &Arc<Shared> = this.shared;
        loop {
            let next = match this.step.as_mut().project() {
                StepProj::Reading {
                    body,
                    parts,
                    gathered,
                } => {
                    let cap = shared.config.max_request_body;
                    let read = ready!(poll_read(body, gathered, cap, cx));
                    let parts = parts.take().expect("read once");
                    match read {
                        Ok(body) => claim(shared, this.inner, *this.fp, parts, body),
                        Err(ReadError::TooLarge) => Next::Ready(Ok(answer(
                            shared,
                            Outcome::RequestTooLarge,
                            too_large(shared),
                        ))),
                        Err(ReadError::Failed(e)) => {
                            let problem = Problem::new(
                                ProblemKind::UnreadableBody,
                                format!("the request body could not be read: {e}"),
                            );
                            Next::Ready(Ok(answer(shared, Outcome::UnreadableBody, problem)))
                        }
                    }
                }
                StepProj::Claiming { claim, parts, body } => {
                    let claim = ready!(claim.as_mut().poll(cx));
                    let parts = parts.take().expect("claimed once");
                    decide(shared, this.inner, claim, parts, std::mem::take(body))
                }
                StepProj::Calling { future, held } => {
                    let result = ready!(future.poll(cx));
                    let mut held = held.take().expect("called once");
                    match held.lease.take() {
                        None => Next::Ready(result.map(|r| r.map(ResponseBody::inner))),
                        Some(lease) => match result {
                            Err(e) => release(shared, lease, Err(e), cx),
                            Ok(response) if !(shared.config.stored_status)(response.status()) => {
                                release(shared, lease, Ok(response.map(ResponseBody::inner)), cx)
                            }
                            Ok(response) => {
                                // The lease is held again while the body is
                                // read: a request dropped now releases it.
                                held.lease = Some(lease);
                                let (head, body) = response.into_parts();
                                Next::Step(Step::Storing {
                                    head: Some(head),
                                    body: Some(Box::pin(body)),
                                    buf: Gathered::default(),
                                    trailers: None,
                                    held: Some(held),
                                })
                            }
                        },
                    }
                }
                StepProj::Storing {
                    head,
                    body,
                    buf,
                    trailers,
                    held,
                } => {
                    let frames = body.as_mut().expect("read until settled");
                    // The handler's error type need not be `Send`: boxed at
                    // once.
                    let next = ready!(frames.as_mut().poll_frame(cx))
                        .map(|frame| frame.map_err(Into::<BoxError>::into));
                    match next {
                        None => {
                            let lease = take_lease(held);
                            let head = head.take().expect("one response");
                            let bytes = std::mem::take(buf).finish();
                            store(shared, lease, head, bytes, Tail::Whole(trailers.take()), cx)
                        }
                        Some(Err(error)) => {
                            let lease = take_lease(held);
                            let head = head.take().expect("one response");
                            let body = ResponseBody::failed(std::mem::take(buf).finish(), error);
                            release(shared, lease, Ok(Response::from_parts(head, body)), cx)
                        }
                        Some(Ok(frame)) => match frame.into_data() {
                            Ok(data)
                                if buf.len() + data.len() > shared.config.max_response_body =>
                            {
                                // Over the cap: the key completes without a
                                // body; the client gets what was read, then
                                // the rest as it comes.
                                let lease = take_lease(held);
                                let head = head.take().expect("one response");
                                buf.push(data);
                                let rest = body.take().expect("read until settled");
                                let read = std::mem::take(buf).finish();
                                store(shared, lease, head, read, Tail::Spilled(rest), cx)
                            }
                            Ok(data) => {
                                buf.push(data);
                                continue;
                            }
                            Err(frame) => {
                                if let Ok(t) = frame.into_trailers() {
                                    *trailers = Some(t);
                                }
                                continue;
                            }
                        },
                    }
                }
                StepProj::Settling { settle, output } => {
                    ready!(settle.as_mut().poll(cx));
                    Next::Ready(output.take().expect("settled once"))
                }
                StepProj::Done => panic!("the request's future was polled after it answered"),
            };
            match next {
                Next::Step(step) => this.step.set(step),
                Next::Ready(answer) => {
                    this.step.set(Step::Done);
                    return Poll::Ready(answer);
                }
            }
        }
    }
}

/// The `413` of a request body over the cap.
pub(crate) fn too_large(shared: &Shared) -> Problem {
    Problem::new(
        ProblemKind::RequestTooLarge,
        format!(
            "requests with an idempotency key may carry at most {} bytes of body (it is read whole to fingerprint it)",
            shared.config.max_request_body
        ),
    )
}

/// Why a request body was not read whole.
enum ReadError {
    TooLarge,
    Failed(BoxError),
}

/// Reads `body` into `gathered` until it ends (then the whole body), or
/// [`ReadError::TooLarge`] as soon as it passes `cap` (never buffering more
/// than `cap` plus one frame).
fn poll_read<B>(
    mut body: Pin<&mut B>,
    gathered: &mut Gathered,
    cap: usize,
    cx: &mut Context<'_>,
) -> Poll<Result<Bytes, ReadError>>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    loop {
        match ready!(body.as_mut().poll_frame(cx)) {
            None => return Poll::Ready(Ok(std::mem::take(gathered).finish())),
            Some(Err(e)) => return Poll::Ready(Err(ReadError::Failed(e.into()))),
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if gathered.len() + data.len() > cap {
                        return Poll::Ready(Err(ReadError::TooLarge));
                    }
                    gathered.push(data);
                }
            }
        }
    }
}

/// Claims the key with the body's payload fingerprint: at once on a
/// direct store, else through the batcher.
fn claim<S, ReqB, ResB>(
    shared: &Arc<Shared>,
    inner: &mut Option<S>,
    fp: Fingerprint,
    parts: request::Parts,
    body: Bytes,
) -> Next<S::Future, ReqB, ResB, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
{
    let config = &shared.config;
    let mut request = ClaimRequest::new(fp).payload((config.fingerprint)(&parts, &body));
    if let Some(lease) = config.lease {
        request = request.lease(lease);
    }
    let wait = match config.in_flight {
        InFlight::Reject { .. } => None,
        InFlight::Wait { timeout, .. } => Some(timeout),
    };
    if shared.store.claims_at_once(wait) {
        let claim = shared.store.claim_at_once(request);
        return decide(shared, inner, claim, parts, body);
    }
    let owner = Arc::clone(shared);
    Next::Step(Step::Claiming {
        claim: Box::pin(async move { owner.store.claim(request, wait).await }),
        parts: Some(parts),
        body,
    })
}

/// What the claim's answer leads to: the handler, or an answer.
fn decide<S, ReqB, ResB>(
    shared: &Arc<Shared>,
    inner: &mut Option<S>,
    claim: Claim<Arc<Deduper>>,
    parts: request::Parts,
    body: Bytes,
) -> Next<S::Future, ReqB, ResB, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
{
    let config = &shared.config;
    let retry_after = match config.in_flight {
        InFlight::Reject { retry_after } | InFlight::Wait { retry_after, .. } => retry_after,
    };
    let problem = match claim {
        Claim::Acquired(lease) => return call(shared, inner, parts, body, Some(lease)),
        Claim::Completed { result, .. } => return Next::Ready(Ok(replay(shared, result))),
        Claim::InProgress { .. } => (
            Outcome::InProgress,
            Problem::new(
                ProblemKind::InProgress,
                "a request with this idempotency key is being processed; retry after the Retry-After delay to get its response",
            )
            .retry_after(retry_after),
        ),
        Claim::Conflict => (
            Outcome::KeyReused,
            Problem::new(
                ProblemKind::KeyReused,
                "this idempotency key was used for a different request (method, target or body); use a new key for a new operation",
            ),
        ),
        Claim::Unavailable | Claim::Late { .. } => match config.on_unavailable {
            OnUnavailable::Reject { retry_after } => (
                Outcome::Unavailable,
                Problem::new(
                    ProblemKind::StoreUnavailable,
                    "the idempotency store cannot be reached; nothing was done, retry with the same key",
                )
                .retry_after(retry_after),
            ),
            OnUnavailable::Proceed => {
                shared.stats.record(Outcome::Unprotected);
                return call(shared, inner, parts, body, None);
            }
        },
    };
    Next::Ready(Ok(answer(shared, problem.0, problem.1)))
}

/// Calls the handler under `lease` (or none: unprotected).
fn call<S, ReqB, ResB>(
    shared: &Arc<Shared>,
    inner: &mut Option<S>,
    parts: request::Parts,
    body: Bytes,
    lease: Option<SharedLease>,
) -> Next<S::Future, ReqB, ResB, S::Error>
where
    S: Service<Request<RequestBody<ReqB>>, Response = Response<ResB>>,
{
    let held = Held {
        lease,
        stats: Arc::clone(&shared.stats),
    };
    shared.stats.handler_ran();
    let mut inner = inner.take().expect("the handler is called once");
    let request = Request::from_parts(parts, RequestBody::buffered(body));
    Next::Step(Step::Calling {
        future: inner.call(request),
        held: Some(held),
    })
}

/// A lease held while the handler runs and its response is read: dropped
/// with the request (the client went away, the handler panicked), it is
/// released and counted.
pub(crate) struct Held {
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

fn take_lease(held: &mut Option<Held>) -> SharedLease {
    held.take()
        .and_then(|mut h| h.lease.take())
        .expect("held while the response is read")
}

/// Polls a direct store's operation, which is done at once (its engine
/// calls are synchronous; only a batched store's operations wait).
fn at_once<T>(cx: &mut Context<'_>, operation: impl Future<Output = T>) -> T {
    let mut operation = std::pin::pin!(operation);
    match operation.as_mut().poll(cx) {
        Poll::Ready(done) => done,
        Poll::Pending => unreachable!("a direct store's operation does not wait"),
    }
}

/// Releases `lease` (the handler failed, or its status is not stored),
/// then answers `output`.
fn release<F, ReqB, ResB, E>(
    shared: &Arc<Shared>,
    lease: SharedLease,
    output: Answer<ResB, E>,
    cx: &mut Context<'_>,
) -> Next<F, ReqB, ResB, E> {
    shared.stats.record(Outcome::Released);
    if shared.store.is_direct() {
        let _ = at_once(cx, shared.store.release(lease));
        return Next::Ready(output);
    }
    let owner = Arc::clone(shared);
    Next::Step(Step::Settling {
        settle: Box::pin(async move {
            let _ = owner.store.release(lease).await;
        }),
        output: Some(output),
    })
}

/// What follows the bytes of a response read for storing.
enum Tail<B> {
    /// Nothing: the body was read whole (then its trailers, if any); it is
    /// stored and answered whole.
    Whole(Option<HeaderMap>),
    /// The rest of a body over the cap: the record is stored without a
    /// body, and the client gets the bytes read, then the rest as it comes.
    Spilled(Pin<Box<B>>),
}

/// Commits the record of the response `head` (with `bytes` when the tail
/// is [`Tail::Whole`]), then answers it — on a direct store at once, else
/// once the batcher has committed.
fn store<F, ReqB, ResB, E>(
    shared: &Arc<Shared>,
    lease: SharedLease,
    head: response::Parts,
    bytes: Bytes,
    tail: Tail<ResB>,
    cx: &mut Context<'_>,
) -> Next<F, ReqB, ResB, E>
where
    ResB: Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    let whole = matches!(tail, Tail::Whole(_));
    let settle = if shared.store.is_direct() {
        let encode = |body: Option<&[u8]>| encode_head(shared, &head, body);
        let stored = whole.then_some(&bytes[..]);
        let outcome = at_once(cx, commit_record(shared, lease, stored, &encode));
        shared.stats.record(outcome);
        None
    } else {
        let owner = Arc::clone(shared);
        let (status, headers) = (head.status, head.headers.clone());
        let stored = whole.then(|| bytes.clone());
        let settle: Boxed<()> = Box::pin(async move {
            let encode = |body: Option<&[u8]>| {
                let replayed = replayable(&owner.config.replay_headers, &headers);
                encode_record(status, || replayed.iter(), body)
            };
            let outcome = commit_record(&owner, lease, stored.as_deref(), &encode).await;
            owner.stats.record(outcome);
        });
        Some(settle)
    };
    let body = match tail {
        Tail::Whole(trailers) => ResponseBody::full_with_trailers(bytes, trailers),
        Tail::Spilled(rest) => ResponseBody::spill(bytes, rest),
    };
    let output = Ok(Response::from_parts(head, body));
    match settle {
        None => Next::Ready(output),
        Some(settle) => Next::Step(Step::Settling {
            settle,
            output: Some(output),
        }),
    }
}

/// The stored record of a response with `head` and `body` (`None`: the
/// status and headers only), encoded straight from its headers.
fn encode_head(shared: &Shared, head: &response::Parts, body: Option<&[u8]>) -> Vec<u8> {
    let replayed = replayable(&shared.config.replay_headers, &head.headers);
    encode_record(head.status, || replayed.iter(), body)
}

/// Commits the record `encode(body)` under `lease`; over the engine's cap,
/// the record without its body (`encode(None)`). A store that cannot
/// answer gets the commit again from the store's retry thread.
async fn commit_record(
    shared: &Shared,
    mut lease: SharedLease,
    mut body: Option<&[u8]>,
    encode: &(impl Fn(Option<&[u8]>) -> Vec<u8> + Sync),
) -> Outcome {
    loop {
        let encoded = encode(body);
        let len = encoded.len();
        return match shared.store.commit(lease, encoded).await {
            Ok(()) => {
                shared.stats.stored(len);
                if body.is_some() {
                    Outcome::Stored
                } else {
                    Outcome::StoredWithoutBody
                }
            }
            Err(CommitError::ResultTooLarge { lease: back, .. }) if body.is_some() => {
                lease = back;
                body = None;
                continue;
            }
            Err(CommitError::Unavailable { lease, .. }) => {
                shared
                    .store
                    .retry_commit(lease, encode(body), &shared.stats);
                Outcome::NotRecorded
            }
            // Lost, or even the bodiless record is over the engine's cap:
            // nothing stored (a retry runs the handler again).
            Err(_) => Outcome::NotRecorded,
        };
    }
}

/// Data frames gathered into one `Bytes`: a single frame (the usual case)
/// is kept as it is, without a copy.
#[derive(Default)]
pub(crate) struct Gathered {
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
