//! The layer on a plain hyper server (no axum): a `tower::ServiceBuilder`
//! stack served through `hyper_util::service::TowerToHyperService`, with
//! hyper's own request body (`Incoming`).

#[path = "support/app.rs"]
mod app;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use app::pay;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tiered_dedup::Deduper;
use tiered_dedup_http::{IdempotencyLayer, RequestBody};
use tower::ServiceBuilder;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let runs = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&runs);
        let handler = tower::service_fn(move |request: http::Request<RequestBody<Incoming>>| {
            let runs = Arc::clone(&counter);
            async move {
                let body = request.into_body().collect().await.unwrap().to_bytes();
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                let mut response = http::Response::new(Full::new(Bytes::from(format!(
                    "run {n} of {}",
                    String::from_utf8_lossy(&body)
                ))));
                *response.status_mut() = http::StatusCode::CREATED;
                Ok::<_, Infallible>(response)
            }
        });
        let service = ServiceBuilder::new()
            .layer(IdempotencyLayer::new(Arc::new(
                Deduper::builder().build().unwrap(),
            )))
            .service(handler);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service = TowerToHyperService::new(service.clone());
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let first = pay(addr, "hyper", 5, &[]).await;
        assert_eq!(first.status, 201);
        assert_eq!(first.body, "run 1 of {\"amount\":5}");
        let again = pay(addr, "hyper", 5, &[]).await;
        assert!(again.is_replay());
        assert_eq!(again.body, first.body);
        assert_eq!(pay(addr, "hyper", 6, &[]).await.status, 422);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        server.abort();
    })
    .await
    .unwrap();
}
