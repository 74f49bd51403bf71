//! What browsers and mobile apps need beyond the plain HTTP API: the analytics.js settings
//! document (`GET /v1/projects/{writeKey}/settings`), CORS per source (`allowed_origins`), the
//! SDK telemetry endpoint (`/v1/m`), and the client's address for `context.ip`.
//!
//! CORS is decided twice. A preflight carries no write key, so it is answered for an origin
//! that any source allows; the request that follows names its source, and is refused (403)
//! unless that source allows the origin. An origin no source allows gets 403 on every `/v1/*`
//! path. Nothing is allowed by default.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts, Path, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::config::ServerConfig;
use crate::http::error::ApiError;
use crate::http::openapi::{Accepted, Failure, SdkSettings, Telemetry};
use crate::http::server::AppState;
use crate::ingest::IngestError;

/// The origins a source accepts browser requests from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowedOrigins {
    any: bool,
    /// Serialized origins (`https://shop.example`, `http://127.0.0.1:3000`).
    origins: Vec<String>,
}

impl AllowedOrigins {
    pub fn new(origins: Vec<String>) -> AllowedOrigins {
        AllowedOrigins {
            any: origins.iter().any(|o| o == "*"),
            origins,
        }
    }

    /// Whether a request with this `Origin` header may come in.
    pub fn allows(&self, origin: &str) -> bool {
        self.any || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// Reads one `allowed_origins` entry: `"*"`, or a scheme, host and optional port.
pub fn parse_origin(text: &str) -> Result<String, String> {
    if text == "*" {
        return Ok(text.to_owned());
    }
    let expected =
        || format!("`{text}` is not an origin such as \"https://shop.example\" or \"*\"");
    let url = url::Url::parse(text).map_err(|_| expected())?;
    if !matches!(url.scheme(), "http" | "https")
        || url.host_str().is_none()
        || !matches!(url.path(), "" | "/")
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
    {
        return Err(expected());
    }
    Ok(url.origin().ascii_serialization())
}

/// The peer's address, when the connection recorded it.
pub struct Peer(pub Option<IpAddr>);

impl<S: Send + Sync> FromRequestParts<S> for Peer {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Peer, Self::Rejection> {
        let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>();
        Ok(Peer(peer.map(|info| info.0.ip())))
    }
}

/// The client's address: the peer, or, when the peer is a trusted proxy, the nearest address in
/// `X-Forwarded-For` that is not one.
pub fn client_ip(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    server: &ServerConfig,
) -> Option<IpAddr> {
    let peer = peer?;
    if !trusted(peer, server) {
        return Some(peer);
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .filter_map(|hop| hop.trim().parse().ok())
        .collect();
    let nearest_untrusted = forwarded.iter().rev().find(|ip| !trusted(**ip, server));
    nearest_untrusted
        .or(forwarded.first())
        .copied()
        .or(Some(peer))
}

fn trusted(ip: IpAddr, server: &ServerConfig) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    server.trusted_proxies.iter().any(|net| net.contains(&ip))
}

/// `http` or `https`: what the client used, per `X-Forwarded-Proto` of a trusted proxy.
fn request_protocol(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    server: &ServerConfig,
) -> &'static str {
    let from_proxy = peer.is_some_and(|peer| trusted(peer, server));
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        });
    match proto.as_deref() {
        Some("https") if from_proxy => "https",
        _ => "http",
    }
}

/// Where SDKs send events: `host[:port][/prefix]/v1` and the protocol, from `[server]
/// public_url`, else from the request.
fn api_host(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    server: &ServerConfig,
) -> Result<(String, &'static str), ApiError> {
    if let Some(url) = &server.public_url {
        let host = url.host_str().unwrap_or_default();
        let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
        let prefix = url.path().trim_end_matches('/');
        let protocol = if url.scheme() == "https" {
            "https"
        } else {
            "http"
        };
        return Ok((format!("{host}{port}{prefix}/v1"), protocol));
    }
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && !h.contains(['/', '\\', ' ', '@']))
        .ok_or_else(|| {
            ApiError::bad_request(
                "invalid_host",
                "the request has no usable Host header; set [server] public_url",
            )
        })?;
    Ok((
        format!("{host}/v1"),
        request_protocol(peer, headers, server),
    ))
}

/// The analytics.js settings of a source (what `AnalyticsBrowser.load({writeKey, cdnURL})`
/// and the mobile SDKs fetch first): the Segment.io integration names this server.
#[utoipa::path(
    get,
    path = "/v1/projects/{writeKey}/settings",
    tag = "ingest",
    params(("writeKey" = String, Path, description = "The source's write key")),
    responses(
        (status = 200, description = "The settings", body = SdkSettings),
        (status = 403, description = "An `Origin` the source does not allow", body = Failure),
        (status = 404, description = "No source has this write key", body = Failure),
    ),
)]
pub async fn settings(
    State(state): State<Arc<AppState>>,
    Path(write_key): Path<String>,
    peer: Peer,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pipeline = state.pipeline.load();
    let source = pipeline
        .sources
        .find(&write_key)
        .ok_or_else(|| ApiError::not_found("no source has this write key"))?;
    check_origin(&source.allowed_origins, &headers)?;
    let (api_host, protocol) = api_host(peer.0, &headers, &pipeline.server)?;
    let document = settings_document(&write_key, &api_host, protocol);
    Ok((
        [(header::CACHE_CONTROL, "public, max-age=60")],
        Json(document),
    )
        .into_response())
}

/// The analytics.js settings: only the Segment.io integration (this server), every call type
/// enabled, and SDK telemetry off (it would be stored nowhere).
fn settings_document(write_key: &str, api_host: &str, protocol: &str) -> Value {
    json!({
        "integrations": {
            "Segment.io": {
                "apiKey": write_key,
                "apiHost": api_host,
                "protocol": protocol,
                "unbundledIntegrations": [],
                "addBundledMetadata": true,
                "maybeBundledConfigIds": {},
                "versionSettings": {"componentTypes": []}
            }
        },
        "plan": {
            "track": {"__default": {"enabled": true, "integrations": {}}},
            "identify": {"__default": {"enabled": true}},
            "group": {"__default": {"enabled": true}}
        },
        "edgeFunction": {},
        "analyticsNextEnabled": true,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {"sampleRate": 0, "host": api_host},
        "legacyVideoPluginsEnabled": false,
        "remotePlugins": []
    })
}

/// A request naming a source must come from an origin that source allows (or from no browser).
pub fn check_origin(allowed: &AllowedOrigins, headers: &HeaderMap) -> Result<(), IngestError> {
    match headers.get(header::ORIGIN) {
        None => Ok(()),
        Some(origin) if origin.to_str().is_ok_and(|o| allowed.allows(o)) => Ok(()),
        Some(_) => Err(IngestError::OriginNotAllowed),
    }
}

fn origin_refused() -> ApiError {
    IngestError::OriginNotAllowed.into()
}

/// CORS on every `/v1/*` path: preflights answered here, an origin no source allows refused,
/// and the allowed origin echoed on every answer.
pub async fn cors(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if !request.uri().path().starts_with("/v1/") {
        return next.run(request).await;
    }
    let Some(origin) = request.headers().get(header::ORIGIN).cloned() else {
        return next.run(request).await;
    };
    let allowed = origin
        .to_str()
        .is_ok_and(|o| state.pipeline.load().sources.any_allows(o));
    if !allowed {
        return origin_refused().into_response();
    }
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let mut response = if preflight {
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        if let Some(asked) = request
            .headers()
            .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        {
            headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
        }
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        );
        response
    } else {
        next.run(request).await
    };
    let headers = response.headers_mut();
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    response
}

/// The SDKs' own telemetry: read, answered 200, stored nowhere.
#[utoipa::path(
    post,
    path = "/v1/m",
    tag = "ingest",
    request_body(content = Telemetry, content_type = "application/json"),
    responses(
        (status = 200, description = "Read and dropped", body = Accepted),
        (status = 403, description = "An `Origin` no source allows", body = Failure),
        (status = 413, description = "Larger than 500 KB", body = Failure),
    ),
)]
pub async fn telemetry(body: axum::body::Body) -> Result<Json<Accepted>, ApiError> {
    // Read to its end within the limit, and dropped: it says nothing about users.
    axum::body::to_bytes(body, crate::ingest::MAX_REQUEST_BYTES)
        .await
        .map_err(|_| crate::ingest::request_too_large())?;
    Ok(Json(Accepted::new(Vec::new())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(proxies: &[&str]) -> ServerConfig {
        ServerConfig {
            trusted_proxies: proxies.iter().map(|p| p.parse().unwrap()).collect(),
            ..ServerConfig::default()
        }
    }

    fn forwarded(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", value.parse().unwrap());
        headers.insert("x-forwarded-proto", "https".parse().unwrap());
        headers
    }

    #[test]
    fn origins_are_normalized_and_matched() {
        assert_eq!(
            parse_origin("https://Shop.Example/").unwrap(),
            "https://shop.example"
        );
        assert_eq!(
            parse_origin("http://127.0.0.1:3000").unwrap(),
            "http://127.0.0.1:3000"
        );
        assert_eq!(
            parse_origin("https://a.example:443").unwrap(),
            "https://a.example"
        );
        for bad in [
            "shop.example",
            "https://a.example/path",
            "ftp://a.example",
            "",
        ] {
            assert!(parse_origin(bad).is_err(), "{bad}");
        }
        let allowed = AllowedOrigins::new(vec!["https://shop.example".into()]);
        assert!(allowed.allows("https://shop.example"));
        assert!(!allowed.allows("https://evil.example"));
        assert!(!AllowedOrigins::default().allows("https://shop.example"));
        assert!(AllowedOrigins::new(vec!["*".into()]).allows("null"));
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let headers = forwarded("203.0.113.7, 10.0.0.9");
        assert_eq!(client_ip(Some(peer), &headers, &server(&[])), Some(peer));
        assert_eq!(request_protocol(Some(peer), &headers, &server(&[])), "http");
        let trusting = server(&["10.0.0.0/8"]);
        assert_eq!(
            client_ip(Some(peer), &headers, &trusting),
            Some("203.0.113.7".parse().unwrap())
        );
        assert_eq!(request_protocol(Some(peer), &headers, &trusting), "https");
        assert_eq!(
            client_ip(Some(peer), &HeaderMap::new(), &trusting),
            Some(peer)
        );
    }

    #[test]
    fn public_url_decides_the_api_host() {
        let mut config = server(&[]);
        config.public_url = Some("https://events.example.com/segment/".parse().unwrap());
        let (host, protocol) = api_host(None, &HeaderMap::new(), &config).unwrap();
        assert_eq!(
            (host.as_str(), protocol),
            ("events.example.com/segment/v1", "https")
        );
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        let (host, protocol) = api_host(None, &headers, &server(&[])).unwrap();
        assert_eq!((host.as_str(), protocol), ("127.0.0.1:8080/v1", "http"));
    }
}
