//! The HTTP/JSON API: `POST /messages`, `GET /messages` (and `/facade`, the same),
//! `GET /v1/messages?limit=N&after=CURSOR`, `GET /healthz`, `GET /metrics`, and its own
//! OpenAPI 3.1 document at `GET /openapi.json`. Every error is `{"error": "..."}` with
//! its status chosen in one place, [`ApiError::into_response`]; the body limit is a
//! layer, not a check in a handler. One middleware ([`record`]) wraps the whole router,
//! unknown paths and `/metrics` included, so every request gets an id and is counted.
//!
//! The document is generated from the handlers: each route is registered from its
//! `#[utoipa::path]` annotation (utoipa-axum's `routes!`), so a route cannot exist
//! without its description, nor a description without its route. The schemas are the
//! types the handlers answer with. `docs/openapi.json` is a copy, kept equal by a test.
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
        header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER},
        HeaderMap, HeaderValue, Method, StatusCode,
    },
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
    Extension, Json, Router,
};
use rpc::request_id;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{openapi::OpenApi, IntoParams, OpenApi as _, ToResponse, ToSchema};
use utoipa_axum::{router::OpenApiRouter, routes};

use crate::message_path::{Facade, FacadeError, FullRead, MessagesText, Page};

/// Seconds a client is told to wait after a 503.
const RETRY_AFTER_SECONDS: &str = "1";
/// JSON framing allowed on top of the message itself.
const BODY_OVERHEAD: usize = 1024;
/// The path `/messages` is also served under, for the lab's clients.
const ALIAS: &str = "/facade";

/// What the document says beyond the routes: the API as a whole, and the schemas every
/// route shares.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "facade",
        description = "The front door of the microservices reference system: POST a \
            message, read the log back whole or page by page. Every response carries \
            `x-request-id` (the request's own when it sent one of 1-128 visible ASCII \
            characters, else a fresh uuid), and every error is `{\"error\": \"...\"}`. \
            A `503` always comes with `Retry-After`. A path not listed here answers `404`, \
            and a method a path does not list `405` with `Allow`, both with the same \
            error body."
    ),
    servers((url = "http://127.0.0.1:8080", description = "the facade's default address")),
    tags(
        (name = "messages", description = "The message log"),
        (name = "operations", description = "Health, metrics and this document"),
    ),
    components(schemas(ErrorBody), responses(Upstream, Unavailable))
)]
struct ApiDoc;

pub fn router(facade: Arc<Facade>) -> Router {
    let body_limit = facade.max_message_bytes() + BODY_OVERHEAD;
    telemetry::metrics(); // installed now: counting starts before the first scrape
    let (messages, _) = routes().with_state(Arc::clone(&facade)).split_for_parts();
    let alias = get(list).post(post).with_state(facade);
    rpc::http_router()
        .merge(messages)
        .route(ALIAS, alias)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn(move |request: Request, next: Next| {
            refuse_declared_over(body_limit, request, next)
        }))
        // `layer`, not `route_layer`: the fallback (404) is wrapped too.
        .layer(middleware::from_fn(record))
}

/// Every route but the alias, each with its handler and its description.
fn routes() -> OpenApiRouter<Arc<Facade>> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(list, post))
        .routes(routes!(page))
        .routes(routes!(healthz))
        .routes(routes!(metrics))
        .routes(routes!(openapi_json))
}

/// The OpenAPI document of this API, as `GET /openapi.json` serves it: the routes'
/// descriptions, and `/facade` described as `/messages` is, under its own operation ids.
pub fn openapi() -> OpenApi {
    let (_, mut doc) = routes().split_for_parts();
    if let Some(mut item) = doc.paths.paths.get("/messages").cloned() {
        for operation in [&mut item.get, &mut item.post].into_iter().flatten() {
            operation.operation_id = operation
                .operation_id
                .take()
                .map(|id| format!("{id}_facade"));
            operation.summary = operation
                .summary
                .take()
                .map(|s| format!("{s} (as /messages)"));
        }
        doc.paths.paths.insert(ALIAS.to_owned(), item);
    }
    doc
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

/// Answers 413 before reading a body whose Content-Length passes `limit`, so a client
/// that waits for `100 Continue` (curl does for big bodies) sends none of it.
async fn refuse_declared_over(limit: usize, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok()?.parse::<u64>().ok());
    match declared {
        Some(declared) if declared > limit as u64 => {
            ApiError::BodyOver(declared, limit).into_response()
        }
        _ => next.run(request).await,
    }
}

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
        Some("/openapi.json") => "/openapi.json",
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

/// `POST /messages`'s body. `msg` is optional here so that a missing one gets its own
/// error; the document says it is required.
#[derive(Debug, Deserialize, ToSchema)]
#[schema(example = json!({"msg": "msg1"}))]
struct PostBody {
    /// The text to store: not empty, and at most `--max-message-bytes` (64 KiB by
    /// default) of UTF-8.
    #[schema(required = true, value_type = String, min_length = 1)]
    msg: Option<String>,
}

/// A stored message's id.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": "0b7e2f44-6f1e-4c3c-9d7a-3a52e4b1f0a1"}))]
struct Created {
    /// The message's uuid: fresh, or derived from the `Idempotency-Key`.
    id: String,
}

/// The lab's answer. It is streamed, never built whole; this type describes it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"logs": ["msg1", "msg2"], "message": "not implemented yet"}))]
#[allow(dead_code)]
struct Logs {
    /// Every text in the log, in insertion order.
    logs: Vec<String>,
    /// The messages service's text; `null` when it could not be reached.
    message: Option<String>,
    /// Present when something was missing from the answer (the messages service).
    #[serde(skip_serializing_if = "Option::is_none")]
    warnings: Option<Vec<String>>,
}

/// Every error's body.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": "msg is empty"}))]
struct ErrorBody {
    /// What went wrong, for a person to read.
    error: String,
}

/// `502`: a logging instance answered with an error the facade did not expect.
#[derive(ToResponse)]
#[response(
    description = "A logging instance answered with an unexpected error",
    headers(("x-request-id" = String, description = "The request's id")),
    example = json!({"error": "the logging service answered with an error"})
)]
#[allow(dead_code)]
struct Upstream(ErrorBody);

/// `503`, always with `Retry-After`.
#[derive(ToResponse)]
#[response(
    description = "No logging instance is registered (answered after `--no-instance-wait`, 1 s); instances are listed but none could take the call within `--retry-budget` (30 s); or the facade or the instances are at a limit",
    headers(
        ("x-request-id" = String, description = "The request's id"),
        ("Retry-After" = String, description = "Seconds to wait before trying again")
    ),
    example = json!({"error": "no logging instance is registered; start one, then try again"})
)]
#[allow(dead_code)]
struct Unavailable(ErrorBody);

/// `/healthz`'s answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"status": "ok"}))]
struct Health {
    status: &'static str,
}

/// The header a POST may send besides [`RequestIdHeader`].
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct PostHeaders {
    /// Makes the POST safe to retry: the same key always gives the same id, and the
    /// message is stored once; the same key with another `msg` is `422`, and the first
    /// message stays.
    #[param(rename = "Idempotency-Key", value_type = String, required = false, min_length = 1, max_length = 256, pattern = r"^[\t -~]+$", example = "order-42")]
    idempotency_key: Option<String>,
}

/// The header any request may send (and every answer carries back).
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)]
struct RequestIdHeader {
    /// The request's id, echoed in the answer's `x-request-id` and in every service's
    /// log lines; one that is not 1-128 visible ASCII characters is replaced.
    #[param(rename = "x-request-id", value_type = String, required = false, example = "lab-1")]
    x_request_id: Option<String>,
}

/// The peer's address, as the server saw the connection.
fn peer_ip(peer: Option<Extension<ConnectInfo<rpc::Peer>>>) -> Option<IpAddr> {
    peer.map(|Extension(ConnectInfo(peer))| peer.addr.ip())
}

/// Store a message
///
/// Gives the message an id and stores it through a live logging instance, moving to
/// the next one when a call fails and retrying with the same id, so it is stored once.
#[utoipa::path(
    post,
    path = "/messages",
    tag = "messages",
    params(PostHeaders, RequestIdHeader),
    request_body(content = PostBody, content_type = "application/json"),
    responses(
        (status = 201, description = "Stored", body = Created, headers(("x-request-id" = String, description = "The request's id"))),
        (status = 400, description = "`msg` empty, missing or not a string; malformed JSON; a bad `Idempotency-Key`", body = ErrorBody, headers(("x-request-id" = String, description = "The request's id")), example = json!({"error": "msg is empty"})),
        (status = 413, description = "The body or `msg` over the limit (`--max-message-bytes`, 64 KiB)", body = ErrorBody, headers(("x-request-id" = String, description = "The request's id")), example = json!({"error": "msg is 70000 bytes, at most 65536 allowed"})),
        (status = 415, description = "No `content-type: application/json`", body = ErrorBody, headers(("x-request-id" = String, description = "The request's id")), example = json!({"error": "Expected request with `Content-Type: application/json`"})),
        (status = 422, description = "The `Idempotency-Key` was used before with another `msg`; the first message stays", body = ErrorBody, headers(("x-request-id" = String, description = "The request's id")), example = json!({"error": "this Idempotency-Key was already used with another message; the first one is kept"})),
        (status = 502, response = Upstream),
        (status = 503, response = Unavailable),
        (status = 507, description = "The store is full: nothing was stored", body = ErrorBody, headers(("x-request-id" = String, description = "The request's id")), example = json!({"error": "the message store is full: nothing was stored"})),
    )
)]
async fn post(
    State(facade): State<Arc<Facade>>,
    Extension(RequestId(request_id)): Extension<RequestId>,
    peer: Option<Extension<ConnectInfo<rpc::Peer>>>,
    headers: HeaderMap,
    body: Result<Json<PostBody>, JsonRejection>,
) -> Result<(StatusCode, Json<Created>), ApiError> {
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
    Ok((StatusCode::CREATED, Json(Created { id })))
}

/// Read the whole log
///
/// Every text in insertion order, and the messages service's text: the lab's answer,
/// for a log of any size (streamed as it is read). If the read breaks and cannot
/// resume, the connection is cut before the end, so a cut-off log never looks whole.
#[utoipa::path(
    get,
    path = "/messages",
    tag = "messages",
    params(RequestIdHeader),
    responses(
        (status = 200, description = "The whole log", body = Logs, headers(("x-request-id" = String, description = "The request's id"))),
        (status = 502, response = Upstream),
        (status = 503, response = Unavailable),
    )
)]
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

/// `GET /v1/messages`'s query.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct PageQuery {
    /// Messages per page, 1-1000 (100 when absent); fewer when the texts pass 1 MiB.
    #[param(value_type = u32, required = false, minimum = 1, maximum = 1000, example = 2)]
    limit: Option<String>,
    /// The `next` of an earlier page; from the start of the log when absent. A cursor
    /// past the end of the log is `400`: the server never made it.
    #[param(value_type = String, required = false, pattern = "^c[1-9][0-9]{0,18}$", example = "c2")]
    after: Option<String>,
}

/// Read one page
///
/// Up to `limit` messages with their ids after the cursor `after`, and the cursor of
/// the next page. Costs the same at any depth of the log.
#[utoipa::path(
    get,
    path = "/v1/messages",
    tag = "messages",
    params(PageQuery, RequestIdHeader),
    responses(
        (status = 200, description = "One page", body = Page, headers(("x-request-id" = String, description = "The request's id")),
            links(("next" = (operation_id = "page", parameters(("after" = "$response.body#/next")), description = "The next page"))),
            example = json!({"messages": [{"id": "0b7e2f44-6f1e-4c3c-9d7a-3a52e4b1f0a1", "msg": "msg1"}, {"id": "5d1c9a0e-2b7f-4e8a-b6c3-0f9e8d7c6b5a", "msg": "msg2"}], "next": "c2"})),
        (status = 400, description = "`limit` not 1-1000, or a cursor the server did not make", body = ErrorBody, headers(("x-request-id" = String, description = "The request's id")), example = json!({"error": "unknown cursor: pass the `next` of an earlier page"})),
        (status = 502, response = Upstream),
        (status = 503, response = Unavailable),
    )
)]
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

/// Liveness
///
/// `200` while the facade serves requests.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "operations",
    params(RequestIdHeader),
    responses((status = 200, description = "Serving", body = Health, headers(("x-request-id" = String, description = "The request's id"))))
)]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

/// Metrics
///
/// The facade's metrics in the Prometheus text format (see the README's "Operating
/// it").
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    params(RequestIdHeader),
    responses((status = 200, description = "Prometheus text", content_type = "text/plain", body = String, headers(("x-request-id" = String, description = "The request's id"))))
)]
async fn metrics() -> Response {
    telemetry::render_metrics().into_response()
}

/// This document
///
/// The OpenAPI 3.1 document of this API, for Postman (Import, then Link) and other
/// tools.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    params(RequestIdHeader),
    responses((status = 200, description = "The document", content_type = "application/json", body = Object, headers(("x-request-id" = String, description = "The request's id"))))
)]
async fn openapi_json() -> Response {
    static DOCUMENT: std::sync::LazyLock<String> =
        std::sync::LazyLock::new(|| openapi().to_pretty_json().expect("the document serializes"));
    ([(CONTENT_TYPE, "application/json")], DOCUMENT.as_str()).into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

#[derive(Debug)]
pub enum ApiError {
    Facade(FacadeError),
    Body(JsonRejection),
    /// A body whose Content-Length passes the limit: (declared, limit).
    BodyOver(u64, usize),
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
            ApiError::BodyOver(declared, limit) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is {declared} bytes, at most {limit} allowed"),
            ),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed here: the Allow header lists the methods this path takes"
                    .to_owned(),
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
        let mut response = (status, Json(ErrorBody { error: message })).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static(RETRY_AFTER_SECONDS));
        }
        response
    }
}
