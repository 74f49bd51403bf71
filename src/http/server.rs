//! The HTTP server: the router (which handler answers what, behind which guards), health and
//! metrics, connection bounds and timeouts. The handlers are in `ingest.rs` (`/v1/*`) and
//! `admin.rs` (`/admin/v1/*`).

pub use crate::http::admin::{replay_json, ReplayRequest};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use arc_swap::ArcSwap;

use crate::http::admin::{
    cancel_replay, dead_letters, destinations, event_path, list_replays, live, pause_destination,
    reload, replay, resume_destination, search_events, show_replay, start_replay, stats_series,
    test_destination,
};
use crate::http::error::ApiError;
use crate::http::ingest::{batch, single};
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
    let admin = admin_routes()
        .into_iter()
        .fold(Router::new(), |router, (path, route)| {
            router.route(path, route)
        });
    let mut app = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(crate::http::openapi::serve))
        // The dashboard's page and assets hold no data: a browser cannot send a bearer token
        // when it navigates, so they are served openly and fetch everything from /admin/v1/*.
        .merge(crate::http::dashboard::router())
        .merge(admin);
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
        // Around everything, so no route under /admin/v1/ can be left open, wherever it is
        // mounted: even an unknown one answers 401 before 404.
        .layer(middleware::from_fn_with_state(state.clone(), require_admin))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::http::browser::cors,
        ))
        .layer(middleware::from_fn(observe))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(panicked))
        .with_state(state)
}

/// Where the token-protected admin API lives.
pub const ADMIN_API: &str = "/admin/v1/";

/// Every admin route; [`admin_paths`] lets a test walk them.
fn admin_routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/admin/v1/destinations", get(destinations)),
        ("/admin/v1/dead-letters", get(dead_letters)),
        ("/admin/v1/dead-letters/replay", post(replay)),
        ("/admin/v1/reload", post(reload)),
        ("/admin/v1/live", get(live)),
        ("/admin/v1/replays", post(start_replay).get(list_replays)),
        (
            "/admin/v1/replays/{id}",
            get(show_replay).delete(cancel_replay),
        ),
        ("/admin/v1/destinations/{name}/test", post(test_destination)),
        (
            "/admin/v1/destinations/{name}/pause",
            post(pause_destination),
        ),
        (
            "/admin/v1/destinations/{name}/resume",
            post(resume_destination),
        ),
        ("/admin/v1/events", get(search_events)),
        ("/admin/v1/events/{message_id}", get(event_path)),
        ("/admin/v1/stats/series", get(stats_series)),
    ]
}

/// The paths of every admin route.
pub fn admin_paths() -> Vec<&'static str> {
    admin_routes().into_iter().map(|(path, _)| path).collect()
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

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "draining"})),
        )
            .into_response();
    }
    if !state.store.ready().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "database unavailable"})),
        )
            .into_response();
    }
    Json(json!({"status": "ready"})).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    crate::http::series::sample(&state).await;
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

/// Every path under `/admin/v1/`: a bearer token compared in constant time. (The dashboard's
/// page and assets, under `/admin` and `/admin/assets/`, hold no data and stay open.)
async fn require_admin(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if !request.uri().path().starts_with(ADMIN_API) {
        return Ok(next.run(request).await);
    }
    let Some(token) = &state.admin_token else {
        return Err(ApiError::unauthorized(
            "the admin API is off: set SWITCHYARD_ADMIN_TOKEN to enable it",
        ));
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    if !bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        return Err(ApiError::unauthorized(
            "send the admin token as `Authorization: Bearer <token>`",
        ));
    }
    Ok(next.run(request).await)
}
