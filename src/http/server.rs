//! The HTTP server: the router (which handler answers what, behind which guards), health and
//! metrics, connection bounds and timeouts. The handlers are in `ingest.rs` (`/v1/*`) and
//! `admin/` (`/admin/v1/*`, one file per resource).

pub use crate::http::admin::{admin_paths, replay_json, ReplayRequest, ADMIN_API};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;

use arc_swap::ArcSwap;

use crate::http::error::ApiError;
use crate::http::ingest::{batch, single};
use crate::http::openapi::Status;
use crate::ingest::backpressure::QueueDepth;
use crate::pipeline::{Pipeline, Reloader};
use crate::store::commit::GroupCommit;
use crate::store::Store;

/// Connections served at once at most; more are closed at accept.
const MAX_CONNECTIONS: usize = 10_000;
/// Largest request head (request line and headers); past it hyper answers 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// How long a client may take to send a request's headers (slowloris) and its body.
#[derive(Debug, Clone, Copy)]
pub struct HttpTimeouts {
    pub headers: Duration,
    pub body: Duration,
}

impl Default for HttpTimeouts {
    fn default() -> Self {
        HttpTimeouts {
            headers: Duration::from_secs(15),
            body: Duration::from_secs(30),
        }
    }
}

/// Serves `app` over HTTP/1.1 until `stop`, then lets requests in progress finish (15 s at
/// most). Headers must arrive in time, heads are bounded in size, and connections in number,
/// so slow or greedy clients cannot pile up memory.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    app: Router,
    timeouts: HttpTimeouts,
    stop: tokio_util::sync::CancellationToken,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("too many connections; closing a new one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        // The peer's address rides along with each request (`context.ip`, trusted proxies).
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<_>| {
            request
                .extensions_mut()
                .insert(axum::extract::ConnectInfo(peer));
            tower::ServiceExt::oneshot(app.clone(), request)
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(timeouts.headers)
            .max_buf_size(MAX_HEAD_BYTES)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            let _ = connection.await;
            drop(slot);
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(15), graceful.shutdown()).await;
}

/// Which parts of the API a process serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub ingest: bool,
}

/// Everything the handlers share.
pub struct AppState {
    pub store: Store,
    /// The config in force; a reload swaps it.
    pub pipeline: Arc<ArcSwap<Pipeline>>,
    pub reloader: Arc<Reloader>,
    pub commit: GroupCommit,
    pub admin_token: Option<String>,
    pub metrics: PrometheusHandle,
    /// Set once shutdown begins: intake stops and `/readyz` answers 503.
    pub draining: AtomicBool,
    /// How long an ingest request waits for its commit before answering 503.
    pub commit_timeout: Duration,
    pub depth: Arc<QueueDepth>,
    pub timeouts: HttpTimeouts,
    /// The live debugger's feed (`GET /admin/v1/live`).
    pub live: crate::http::live::LiveFeed,
    /// Accepted and rejected events per source and second, for the dashboard.
    pub source_rates: crate::rates::SourceRates,
}

pub fn router(state: Arc<AppState>, roles: Roles) -> Router {
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(crate::http::openapi::serve))
        // The dashboard's page and assets hold no data: a browser cannot send a bearer token
        // when it navigates, so they are served openly and fetch everything from /admin/v1/*.
        .merge(crate::http::dashboard::router())
        .merge(crate::http::admin::router());
    if roles.ingest {
        app = app
            .route("/v1/batch", post(batch))
            .route("/v1/import", post(batch))
            .route("/v1/b", post(batch))
            .route("/v1/m", post(crate::http::browser::telemetry))
            .route(
                "/v1/projects/{write_key}/settings",
                get(crate::http::browser::settings),
            )
            .route("/v1/{call}", post(single));
    }
    app.fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // Around everything, so no route under /admin/v1/ can be left open, wherever it is
        // mounted: even an unknown one answers 401 before 404.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::http::admin::require_admin,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::http::browser::cors,
        ))
        .layer(middleware::from_fn(observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state)
}

/// Per request: a tracing span, and the HTTP metrics (`switchyard_http_requests_total`,
/// `switchyard_http_request_duration_seconds`) labelled by route pattern, never by raw path.
async fn observe(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = method_label(request.method());
    let span = tracing::info_span!("request", %method, %route);
    let started = std::time::Instant::now();
    let response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    span.in_scope(|| tracing::debug!(status, elapsed_ms = elapsed.as_millis() as u64, "answered"));
    metrics::counter!("switchyard_http_requests_total", "method" => method, "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    metrics::histogram!("switchyard_http_request_duration_seconds", "route" => route)
        .record(elapsed.as_secs_f64());
    response
}

/// A method as a metric label: the standard ones by name, anything a client makes up as
/// `other`, so no client can add series.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// A handler that panicked (a bug): the client still gets a JSON answer, and the process lives.
fn panicked(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        "the request could not be handled; nothing was stored",
    )
    .into_response()
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

/// A route asked with a method it does not have (the framework adds `Allow`).
async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this endpoint does not take {method}; `Allow` lists what it takes"),
    )
}

/// The process is alive.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses((status = 200, description = "Alive", body = Status)),
)]
async fn healthz() -> Json<Status> {
    Json(Status::new("ok"))
}

/// The database answers, migrations are applied, and the process is not shutting down.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Status),
        (status = 503, description = "Draining, or the database is unavailable", body = Status),
    ),
)]
async fn readyz(State(state): State<Arc<AppState>>) -> (StatusCode, Json<Status>) {
    let unready = |status| (StatusCode::SERVICE_UNAVAILABLE, Json(Status::new(status)));
    if state.draining.load(Ordering::Acquire) {
        return unready("draining");
    }
    if !state.store.ready().await {
        return unready("database unavailable");
    }
    (StatusCode::OK, Json(Status::new("ready")))
}

/// Prometheus metrics.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    responses(
        (status = 200, description = "Prometheus text exposition format",
         body = String, content_type = "text/plain"),
    ),
)]
async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    crate::http::series::sample(&state).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
