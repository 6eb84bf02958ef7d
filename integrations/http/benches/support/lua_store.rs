//! The peer: idempotency keys as a team would hand-write them over Redis —
//! per request, one Lua claim of a JSON record (`GET`, else `SET … PX`),
//! then, after the handler, one `SET … EX` of the response as JSON. A tower
//! layer like ours, on a multiplexed connection (concurrent requests'
//! commands pipelined on one socket: the peer at its best).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::{Layer, Service};

const CLAIM: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
";

#[derive(Clone)]
pub struct LuaStoreLayer {
    conn: redis::aio::MultiplexedConnection,
    script: redis::Script,
}

impl LuaStoreLayer {
    pub async fn connect(url: &str) -> Self {
        let client = redis::Client::open(url).unwrap();
        LuaStoreLayer {
            conn: client.get_multiplexed_async_connection().await.unwrap(),
            script: redis::Script::new(CLAIM),
        }
    }
}

impl<S> Layer<S> for LuaStoreLayer {
    type Service = LuaStore<S>;
    fn layer(&self, inner: S) -> LuaStore<S> {
        LuaStore {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct LuaStore<S> {
    inner: S,
    layer: LuaStoreLayer,
}

fn answer(status: StatusCode, body: impl Into<Body>) -> Response<Body> {
    let mut r = Response::new(body.into());
    *r.status_mut() = status;
    r
}

impl<S> Service<Request<Body>> for LuaStore<S>
where
    S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let LuaStoreLayer { mut conn, script } = self.layer.clone();
        Box::pin(async move {
            let Some(key) = request
                .headers()
                .get("idempotency-key")
                .and_then(|v| v.to_str().ok())
                .map(|k| format!("idem:{k}"))
            else {
                return Ok(answer(StatusCode::BAD_REQUEST, "missing key"));
            };
            let (parts, body) = request.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let fp = xxhash_rust::xxh3::xxh3_64(&body).to_string();
            let pending = json!({"state": "in_progress", "fp": fp}).to_string();
            let current: Option<String> = match script
                .key(&key)
                .arg(pending)
                .arg(30_000)
                .invoke_async(&mut conn)
                .await
            {
                Ok(v) => v,
                Err(_) => return Ok(answer(StatusCode::SERVICE_UNAVAILABLE, "store down")),
            };
            if let Some(record) = current {
                let v: Value = serde_json::from_str(&record).unwrap();
                if v["fp"] != fp.as_str() {
                    return Ok(answer(StatusCode::UNPROCESSABLE_ENTITY, "key reused"));
                }
                if v["state"] == "in_progress" {
                    return Ok(answer(StatusCode::CONFLICT, "in progress"));
                }
                let mut r = answer(
                    StatusCode::from_u16(v["status"].as_u64().unwrap() as u16).unwrap(),
                    v["body"].as_str().unwrap().to_owned(),
                );
                r.headers_mut()
                    .insert("idempotent-replayed", "true".parse().unwrap());
                return Ok(r);
            }
            let response = inner
                .call(Request::from_parts(parts, Body::from(body)))
                .await?;
            let (head, body) = response.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            if head.status.is_server_error() {
                let _: Result<(), _> = redis::cmd("DEL").arg(&key).query_async(&mut conn).await;
            } else {
                let record = json!({
                    "state": "done",
                    "fp": fp,
                    "status": head.status.as_u16(),
                    "body": String::from_utf8_lossy(&body),
                })
                .to_string();
                let _: Result<(), _> = redis::cmd("SET")
                    .arg(&key)
                    .arg(record)
                    .arg("EX")
                    .arg(86_400)
                    .query_async(&mut conn)
                    .await;
            }
            Ok(Response::from_parts(head, Body::from(body)))
        })
    }
}
