//! Sends plugins' HTTP requests: one shared connection pool, a timeout on every request, no
//! redirects followed, and a bounded read of the answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;

use crate::config::SecurityConfig;
use crate::delivery::egress::{self, EgressPolicy, GuardedResolver};
use crate::destination::{HttpRequest, HttpResponse, HttpSender, SendError};

/// Bytes of a vendor's answer kept at most (enough for any error body worth reading).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The process-wide HTTP client and the address policy it enforces.
#[derive(Clone)]
pub struct HttpClient {
    client: reqwest::Client,
    policy: Arc<EgressPolicy>,
}

impl HttpClient {
    pub fn new(security: &SecurityConfig) -> HttpClient {
        let policy = Arc::new(EgressPolicy::new(security));
        let resolver = Arc::new(GuardedResolver {
            policy: policy.clone(),
        });
        // The config check already read the file; should it have gone since, the system roots
        // still serve and the vendor's certificate decides.
        let roots = match security.ca_file.as_deref().map(read_roots) {
            Some(Ok(roots)) => roots,
            Some(Err(error)) => {
                tracing::error!(%error, "ca_file cannot be used");
                Vec::new()
            }
            None => Vec::new(),
        };
        HttpClient {
            client: build(resolver, roots),
            policy,
        }
    }
}

/// The certificates of a PEM file (`[security] ca_file`): roots outbound HTTPS trusts besides
/// the system store.
pub fn read_roots(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let roots = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| format!("{} is not a PEM certificate bundle: {e}", path.display()))?;
    if roots.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(roots)
}

fn build(resolver: Arc<GuardedResolver>, roots: Vec<reqwest::Certificate>) -> reqwest::Client {
    roots
        .into_iter()
        .fold(reqwest::Client::builder(), |builder, root| {
            builder.add_root_certificate(root)
        })
        .dns_resolver(resolver)
        .redirect(reqwest::redirect::Policy::none())
        // `HTTP(S)_PROXY` would resolve and connect on our behalf, past the address policy.
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(256)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .user_agent(concat!("switchyard/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the HTTP client's settings are valid")
}

/// A sender bound to one destination's timeout.
pub struct Sender {
    pub http: HttpClient,
    pub timeout: Duration,
}

impl HttpSender for Sender {
    fn send(&self, request: HttpRequest) -> BoxFuture<'_, Result<HttpResponse, SendError>> {
        Box::pin(async move {
            let timeout = self.timeout;
            // A literal address never reaches the resolver: check it here.
            if let Some(address) = literal_address(&request.url) {
                if let Err(refused) = self.http.policy.check(address) {
                    return Err(SendError::Refused(refused.to_string()));
                }
            }
            let exchange = async {
                let response = self
                    .http
                    .client
                    .request(request.method, request.url)
                    .headers(request.headers)
                    .body(request.body)
                    .send()
                    .await?;
                let status = response.status().as_u16();
                let headers = response.headers().clone();
                let body = read_limited(response).await?;
                Ok::<_, reqwest::Error>(HttpResponse {
                    status,
                    headers,
                    body,
                })
            };
            match tokio::time::timeout(timeout, exchange).await {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(error)) if error.is_timeout() => Err(SendError::Timeout(timeout)),
                Ok(Err(error)) if egress::refused_in(&error).is_some() => {
                    let refused = egress::refused_in(&error).map(ToString::to_string);
                    Err(SendError::Refused(refused.unwrap_or_default()))
                }
                Ok(Err(error)) => Err(SendError::Connect(describe(&error))),
                Err(_) => Err(SendError::Timeout(timeout)),
            }
        })
    }

    fn allowed_addresses<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, Result<Vec<std::net::IpAddr>, String>> {
        Box::pin(egress::resolve_allowed(&self.http.policy, host, port))
    }
}

fn literal_address(url: &url::Url) -> Option<std::net::IpAddr> {
    match url.host()? {
        url::Host::Ipv4(v4) => Some(v4.into()),
        url::Host::Ipv6(v6) => Some(v6.into()),
        url::Host::Domain(_) => None,
    }
}

async fn read_limited(mut response: reqwest::Response) -> Result<Bytes, reqwest::Error> {
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_RESPONSE_BYTES - body.len();
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_RESPONSE_BYTES {
            break;
        }
    }
    Ok(body.freeze())
}

/// A transport error in a sentence, without the URL's query (it may hold credentials).
fn describe(error: &reqwest::Error) -> String {
    let what = if error.is_connect() {
        "connection failed"
    } else if error.is_timeout() {
        "timed out"
    } else if error.is_body() || error.is_decode() {
        "reading the answer failed"
    } else {
        "request failed"
    };
    let mut cause = std::error::Error::source(error);
    let mut detail = String::new();
    while let Some(inner) = cause {
        detail = inner.to_string();
        cause = inner.source();
    }
    if detail.is_empty() {
        what.to_owned()
    } else {
        format!("{what}: {detail}")
    }
}
