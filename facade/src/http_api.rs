//! The HTTP/JSON API: `POST /messages`, `GET /messages` (and `/facade`, the same),
//! `GET /v1/messages?limit=N&after=CURSOR`, `GET /healthz`, `GET /metrics`. Every error
//! is `{"error": "..."}` with its status chosen in one place, [`ApiError::into_response`];
//! the body limit is a layer, not a check in a handler. One middleware ([`record`]) wraps
//! the whole router, unknown paths and `/metrics` included, so every request gets an id
//! and is counted.
//!
//! `GET /messages` is the lab's answer, `{"logs":["msg1",...],"message":"..."}`, for a
//! log of any size: the body is chunked and written batch by batch as the log is read,
//! so neither side holds it whole. If the read breaks and cannot resume, the connection
//! is aborted (no final chunk), so a client can never take a cut-off log for the whole.

use std::{net::IpAddr, sync::Arc};

use axum::{
    body::{Body, Bytes},
    extract::{
        rejection::{JsonRejection, QueryRejection},
        ConnectInfo, DefaultBodyLimit, MatchedPath, Query, Request, State,
    },
    http::{
        header::{CONTENT_TYPE, RETRY_AFTER},
        HeaderMap, HeaderValue, Method, StatusCode,
    },
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, MethodRouter},
    Extension, Json, Router,
};
use rpc::request_id;
use serde::Deserialize;
use serde_json::json;

use crate::message_path::{Facade, FacadeError, FullRead, MessagesText, Page};

/// Seconds a client is told to wait after a 503.
const RETRY_AFTER_SECONDS: &str = "1";
/// JSON framing allowed on top of the message itself.
const BODY_OVERHEAD: usize = 1024;

pub fn router(facade: Arc<Facade>) -> Router {
    let body_limit = facade.max_message_bytes() + BODY_OVERHEAD;
    let messages =
        || -> MethodRouter<Arc<Facade>> { get(list).post(post).fallback(method_not_allowed) };
    rpc::http_router()
        .route("/messages", messages())
        .route("/facade", messages())
        .route("/v1/messages", get(page).fallback(method_not_allowed))
        .route("/healthz", get(healthz))
        .with_state(facade)
        .merge(telemetry::metrics_router())
        .layer(DefaultBodyLimit::max(body_limit))
        // `layer`, not `route_layer`: the fallback (404) is wrapped too.
        .layer(middleware::from_fn(record))
}

/// The status code as a label, without allocating for the codes this API answers.
fn status_label(status: StatusCode) -> metrics::SharedString {
    match status.as_u16() {
        200 => "200".into(),
        201 => "201".into(),
        400 => "400".into(),
        404 => "404".into(),
        405 => "405".into(),
        413 => "413".into(),
        415 => "415".into(),
        422 => "422".into(),
        507 => "507".into(),
        502 => "502".into(),
        503 => "503".into(),
        other => other.to_string().into(),
    }
}

/// The request's id, from `x-request-id` or made fresh; handlers extract it.
#[derive(Debug, Clone)]
struct RequestId(String);

/// Gives every request an id (echoed in the `x-request-id` response header), counts
/// every request by route (`unmatched` for unknown paths), method and status, and times
/// it.
async fn record(mut request: Request, next: Next) -> Response {
    let id = request_id::accept(
        request
            .headers()
            .get(request_id::HEADER)
            .and_then(|v| v.to_str().ok()),
    );
    request.extensions_mut().insert(RequestId(id.clone()));
    // Labels are static strings, so counting a request allocates nothing.
    let route = match request
        .extensions()
        .get::<MatchedPath>()
        .map(MatchedPath::as_str)
    {
        Some("/messages") => "/messages",
        Some("/facade") => "/facade",
        Some("/v1/messages") => "/v1/messages",
        Some("/healthz") => "/healthz",
        Some("/metrics") => "/metrics",
        Some(_) => "other",
        None => "unmatched",
    };
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::HEAD => "HEAD",
        _ => "other",
    };
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    metrics::histogram!("facade_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("facade_http_requests_total", "route" => route, "method" => method,
                      "status" => status_label(response.status()))
    .increment(1);
    let mut response = response;
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(request_id::HEADER, value);
    }
    response
}

#[derive(Debug, Deserialize)]
struct PostBody {
    msg: Option<String>,
}

/// The peer's address, as the server saw the connection.
fn peer_ip(peer: Option<Extension<ConnectInfo<rpc::Peer>>>) -> Option<IpAddr> {
    peer.map(|Extension(ConnectInfo(peer))| peer.addr.ip())
}

async fn post(
    State(facade): State<Arc<Facade>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    peer: Option<Extension<ConnectInfo<rpc::Peer>>>,
    headers: HeaderMap,
    body: Result<Json<PostBody>, JsonRejection>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let Json(body) = body?;
    let msg = body.msg.ok_or(FacadeError::MissingMessage)?;
    let key =
        match headers.get("idempotency-key") {
            None => None,
            Some(value) => Some(value.to_str().map_err(|_| {
                FacadeError::InvalidIdempotencyKey("must be visible ASCII".to_owned())
            })?),
        };
    let id = facade.post(msg, key, &request_id, peer_ip(peer)).await?;
    Ok((StatusCode::CREATED, Json(json!({ "id": id }))))
}

/// The lab's GET, streamed: see the module docs.
async fn list(
    State(facade): State<Arc<Facade>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    peer: Option<Extension<ConnectInfo<rpc::Peer>>>,
) -> Result<Response, ApiError> {
    // Fails with a proper status if no instance can even start the read.
    let read = facade.read_all(&request_id, peer_ip(peer)).await?;
    let messages = tokio::spawn({
        let facade = Arc::clone(&facade);
        async move { facade.messages_text(&request_id).await }
    });
    let body = futures_util::stream::unfold(Some((read, true, messages)), lab_chunk);
    Ok((
        [(CONTENT_TYPE, "application/json")],
        Body::from_stream(body),
    )
        .into_response())
}

type LabState = (FullRead, bool, tokio::task::JoinHandle<MessagesText>);

/// The next chunk of the lab's answer: the opening and the first texts, more texts, or
/// the closing with the messages service's text. An error aborts the response.
async fn lab_chunk(
    state: Option<LabState>,
) -> Option<(Result<Bytes, std::io::Error>, Option<LabState>)> {
    let (mut read, first, messages) = state?;
    let mut chunk = Vec::new();
    if first {
        chunk.extend_from_slice(br#"{"logs":["#);
    }
    match read.next().await {
        Ok(Some(texts)) => {
            chunk.reserve(texts.iter().map(|text| text.len() + 3).sum());
            for (i, text) in texts.iter().enumerate() {
                if !first || i > 0 {
                    chunk.push(b',');
                }
                json_string(&mut chunk, text);
            }
            Some((Ok(Bytes::from(chunk)), Some((read, false, messages))))
        }
        Ok(None) => {
            let MessagesText { text, warnings } = messages.await.unwrap_or_else(|_| MessagesText {
                text: None,
                warnings: vec!["messages service unavailable".to_owned()],
            });
            chunk.extend_from_slice(br#"],"message":"#);
            chunk.extend_from_slice(json!(text).to_string().as_bytes());
            if !warnings.is_empty() {
                chunk.extend_from_slice(br#","warnings":"#);
                chunk.extend_from_slice(json!(warnings).to_string().as_bytes());
            }
            chunk.push(b'}');
            Some((Ok(Bytes::from(chunk)), None))
        }
        Err(error) => Some((Err(std::io::Error::other(error.to_string())), None)),
    }
}

/// Appends `text` as a JSON string, written straight into `out`.
fn json_string(out: &mut Vec<u8>, text: &str) {
    serde_json::to_writer(out, text).expect("a string always serializes");
}

#[derive(Debug, Deserialize)]
struct PageQuery {
    limit: Option<String>,
    after: Option<String>,
}

/// `GET /v1/messages?limit=N&after=CURSOR`: one page with ids, and the next cursor.
async fn page(
    State(facade): State<Arc<Facade>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    query: Result<Query<PageQuery>, QueryRejection>,
) -> Result<Json<Page>, ApiError> {
    let Query(query) = query?;
    let limit = query
        .limit
        .map(|limit| limit.parse::<u32>().map_err(|_| FacadeError::InvalidLimit))
        .transpose()?;
    Ok(Json(
        facade
            .read_page(query.after.as_deref(), limit, &request_id)
            .await?,
    ))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[derive(Debug)]
pub enum ApiError {
    Facade(FacadeError),
    Body(JsonRejection),
    Query(QueryRejection),
    MethodNotAllowed,
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        Self::Query(rejection)
    }
}

impl From<FacadeError> for ApiError {
    fn from(error: FacadeError) -> Self {
        Self::Facade(error)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::Body(rejection)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = match self {
            ApiError::Body(rejection) => {
                let status = match &rejection {
                    JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    JsonRejection::JsonSyntaxError(_) | JsonRejection::JsonDataError(_) => {
                        StatusCode::BAD_REQUEST
                    }
                    // Over the body limit: 413; any other failure reading the body: its own.
                    other => other.status(),
                };
                (status, rejection.body_text())
            }
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: /messages and /facade take GET and POST, /v1/messages takes GET".to_owned(),
            ),
            ApiError::Query(rejection) => (StatusCode::BAD_REQUEST, rejection.body_text()),
            ApiError::Facade(error) => {
                let status = match &error {
                    FacadeError::MissingMessage
                    | FacadeError::EmptyMessage
                    | FacadeError::InvalidIdempotencyKey(_)
                    | FacadeError::Invalid(_)
                    | FacadeError::InvalidLimit
                    | FacadeError::InvalidCursor => StatusCode::BAD_REQUEST,
                    FacadeError::MessageTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                    FacadeError::KeyReused => StatusCode::UNPROCESSABLE_ENTITY,
                    FacadeError::StoreFull => StatusCode::INSUFFICIENT_STORAGE,
                    FacadeError::Unavailable { .. }
                    | FacadeError::NoInstance(_)
                    | FacadeError::ShuttingDown
                    | FacadeError::Broken
                    | FacadeError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
                    FacadeError::Upstream(_) => StatusCode::BAD_GATEWAY,
                };
                (status, error.to_string())
            }
        };
        let mut response = (status, Json(json!({ "error": message }))).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        response
    }
}
