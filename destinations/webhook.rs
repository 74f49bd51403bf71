//! `webhook`: POSTs events to your own HTTP endpoint, or spreads them over several.
//!
//! With `batch_size = 1` (the default) the body is the event itself; with more it is
//! `{"batch": [...]}`. When `secret` is set, every request is signed as Standard Webhooks
//! specifies (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
//!
//! With several `urls` (replicas of one receiver), each request goes to the endpoint
//! [`balancer`] chooses: the power of two choices over this process's requests in flight,
//! each endpoint's recent errors and the utilization it reports in `X-Server-Utilization`,
//! with unhealthy and saturated endpoints left out, probation, ramp-up, and retries sent
//! elsewhere. A failure with another endpoint available is that endpoint's, not the receiver's:
//! it is retried without slowing the whole destination down (no `throttled`, no
//! `Retry-After` pause; the endpoint itself is set aside for its `Retry-After`). Per-endpoint
//! stats are in `GET /admin/v1/destinations` and the `switchyard_endpoint_*` metrics.
//!
//! (Over 600 lines with its tests; the kind itself is about 460.)

pub mod balancer;
mod signing;

pub use signing::sign;

use std::any::Any;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use url::Url;

use crate::config::redact;
use crate::destination::{
    classify_status, Built, DeliveryContext, Destination, EndpointStats, Event, HttpRequest,
    HttpResponse, Kind, KindDefaults, Outcome, SendError, SettingError, Settings, Verdict,
};
use balancer::{Answer, Balancer, Policy, Report, Strategy};
use signing::{body, decode_secret, webhook_id};

pub static KIND: Kind = Kind {
    name: "webhook",
    catalog_name: "Webhooks",
    defaults: KindDefaults {
        batch_size: 1,
        max_batch_size: 1000,
        rate_limit: None,
    },
    build,
};

/// The keys a `webhook` destination takes besides the common ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookConfig {
    /// Where to POST.
    url: Option<String>,
    /// Several endpoints of one receiver (its replicas); requests are load-balanced over them.
    urls: Option<Vec<String>>,
    /// `whsec_` + base64 key: sign requests the Standard Webhooks way.
    secret: Option<String>,
    /// Extra headers sent with every request.
    #[serde(default)]
    headers: toml::Table,
    /// With several `urls`, how requests are spread: `"p2c"` (the default: the power of two
    /// choices, steering away from busy, failing or saturated endpoints) or `"round_robin"`
    /// (in turn, whatever their state).
    balance: Option<String>,
    /// With several `urls`, whether the utilization an endpoint reports steers requests: an
    /// endpoint may answer with `X-Server-Utilization: 0.0..1.0`, the share of its capacity in
    /// use by every client (which one Switchyard process cannot see); at 0.9 or more it is left
    /// out while others have room. Default `true`.
    use_utilization: Option<bool>,
    /// With several `urls`, how long an endpoint added at a reload takes to grow to its full
    /// share, so a cold replica is not flooded. Default `"90s"`; `"0s"` turns it off.
    ramp_up: Option<String>,
    /// With several `urls`, how long an endpoint's error rate and reported utilization take to
    /// fade to zero after its last answer, so no endpoint is left out for ever. Default `"30s"`.
    stats_decay: Option<String>,
}

/// A configured webhook destination.
pub struct Webhook {
    /// The destination's name: the `destination` label of the endpoint metrics.
    name: String,
    urls: Vec<Url>,
    /// With several `urls`: which one each request goes to.
    balancer: Option<Arc<Balancer>>,
    /// The `endpoint` label of each URL (credentials and query masked).
    labels: Vec<String>,
    /// When every endpoint's gauges were last set (they fade between answers).
    gauges_set: Mutex<Option<Instant>>,
    signing_key: Option<Vec<u8>>,
    headers: HeaderMap,
}

/// How often every endpoint's gauges are refreshed at most (an endpoint left out gets no
/// answers, yet its error rate fades).
const GAUGES_EVERY: Duration = Duration::from_secs(1);

fn build(settings: &Settings) -> Result<Built, Vec<SettingError>> {
    let mut errors = Vec::new();
    let Some(config) = settings.parse::<WebhookConfig>(&mut errors) else {
        return Err(errors);
    };
    let raw_urls: Vec<(&str, &String)> = match (&config.url, &config.urls) {
        (Some(url), None) => vec![("url", url)],
        (None, Some(urls)) if !urls.is_empty() => urls.iter().map(|u| ("urls", u)).collect(),
        (None, Some(_)) => {
            errors.push(SettingError::new("urls", "needs at least one URL"));
            Vec::new()
        }
        (Some(_), Some(_)) => {
            errors.push(SettingError::new("urls", "give `url` or `urls`, not both"));
            Vec::new()
        }
        (None, None) => {
            errors.push(SettingError {
                key: None,
                message: "a webhook destination needs `url` (or `urls`)".into(),
            });
            Vec::new()
        }
    };
    let mut urls: Vec<Url> = Vec::new();
    for (key, raw) in raw_urls {
        match parse_http_url(raw) {
            Ok(url) if urls.contains(&url) => errors.push(SettingError::new(
                key,
                format!("`{}` is listed twice", redact::url(raw)),
            )),
            Ok(url) => urls.push(url),
            Err(message) => errors.push(SettingError::new(key, message)),
        }
    }
    let policy = policy(&config, &mut errors);
    let signing_key = match &config.secret {
        None => None,
        Some(secret) => match decode_secret(secret) {
            Ok(key) => Some(key),
            Err(message) => {
                errors.push(SettingError::new("secret", message));
                None
            }
        },
    };
    let mut headers = HeaderMap::new();
    for (name, value) in &config.headers {
        let parsed = HeaderName::from_bytes(name.as_bytes()).ok().zip(
            value
                .as_str()
                .and_then(|value| HeaderValue::from_str(value).ok()),
        );
        match parsed {
            Some((name, value)) => {
                headers.insert(name, value);
            }
            None => errors.push(SettingError::new(
                "headers",
                format!("`{name}` must be a header name with a string value"),
            )),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let balancer = (urls.len() > 1)
        .then(|| Arc::new(Balancer::new(&urls, policy, Instant::now(), rand::random())));
    Ok(Built {
        plugin: Arc::new(Webhook {
            name: settings.name.to_owned(),
            labels: labels(&urls),
            urls,
            balancer,
            gauges_set: Mutex::new(None),
            signing_key,
            headers,
        }),
        credential: None,
    })
}

/// The balancing keys, checked.
fn policy(config: &WebhookConfig, errors: &mut Vec<SettingError>) -> Policy {
    let mut policy = Policy::default();
    match config.balance.as_deref() {
        None | Some("p2c") => {}
        Some("round_robin") => policy.strategy = Strategy::RoundRobin,
        Some(other) => errors.push(SettingError::new(
            "balance",
            format!("`{other}` is not a strategy: use \"p2c\" or \"round_robin\""),
        )),
    }
    if let Some(use_utilization) = config.use_utilization {
        policy.use_utilization = use_utilization;
    }
    if let Some(raw) = &config.ramp_up {
        match humantime::parse_duration(raw) {
            Ok(ramp_up) => policy.ramp_up = ramp_up,
            Err(error) => errors.push(SettingError::new(
                "ramp_up",
                format!("bad duration `{raw}`: {error}"),
            )),
        }
    }
    if let Some(raw) = &config.stats_decay {
        match humantime::parse_duration(raw) {
            Ok(decay) if !decay.is_zero() => policy.decay = decay,
            Ok(_) => errors.push(SettingError::new(
                "stats_decay",
                format!("bad duration `{raw}`: must be longer than zero"),
            )),
            Err(error) => errors.push(SettingError::new(
                "stats_decay",
                format!("bad duration `{raw}`: {error}"),
            )),
        }
    }
    policy
}

/// An absolute `http` or `https` URL.
pub fn parse_http_url(raw: &str) -> Result<Url, String> {
    // Errors are logged and answered by the reload API: the URL's secrets stay out of them.
    let shown = redact::url(raw);
    let url = Url::parse(raw).map_err(|e| format!("`{shown}` is not a valid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
        return Err(format!("`{shown}` must be an http:// or https:// URL"));
    }
    Ok(url)
}

impl Webhook {
    /// The signed request for `events` to `url`.
    fn request(&self, url: &Url, events: &[Event]) -> HttpRequest {
        let mut request = HttpRequest::post_json(url.clone(), body(events));
        for (name, value) in &self.headers {
            request.headers.insert(name.clone(), value.clone());
        }
        let id = webhook_id(events);
        if let Some(key) = &self.signing_key {
            let timestamp = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or_default();
            let signature = sign(key, &id, timestamp, &request.body);
            let headers = &mut request.headers;
            headers.insert("webhook-timestamp", HeaderValue::from(timestamp));
            if let Ok(value) = HeaderValue::from_str(&signature) {
                headers.insert("webhook-signature", value);
            }
        }
        if let Ok(value) = HeaderValue::from_str(&id) {
            request.headers.insert("webhook-id", value);
        }
        request
    }

    /// One request through the balancer: choose, send, learn, and say what the answer means
    /// for the batch.
    async fn deliver_balanced(
        &self,
        balancer: &Balancer,
        ctx: &DeliveryContext<'_>,
        events: &[Event],
    ) -> Verdict {
        // A retried batch is claimed again starting with its oldest event.
        let retry_key = events.first().map(|event| event.message_id.as_str());
        let pick = balancer.pick(retry_key, Instant::now());
        let index = pick.index();
        self.gauge(
            "switchyard_endpoint_in_flight",
            index,
            pick.in_flight() as f64,
        );
        let result = ctx.http.send(self.request(&self.urls[index], events)).await;
        let (outcome, report, label) = judge(result);
        let settled = pick.finish(report, retry_key, Instant::now());
        metrics::counter!(
            "switchyard_endpoint_requests_total",
            "destination" => self.name.clone(),
            "endpoint" => self.labels[index].clone(),
            "outcome" => label,
        )
        .increment(1);
        self.gauge(
            "switchyard_endpoint_in_flight",
            index,
            settled.in_flight as f64,
        );
        self.gauge("switchyard_endpoint_error_rate", index, settled.error_rate);
        self.refresh_gauges(balancer);
        Verdict::All(self.localize(outcome, index, settled.elsewhere))
    }

    /// Names the endpoint in the message; with another endpoint available, a retry is this
    /// endpoint's problem, so it neither slows the destination down nor pauses it.
    fn localize(&self, outcome: Outcome, index: usize, elsewhere: bool) -> Outcome {
        let endpoint = &self.labels[index];
        match outcome {
            Outcome::Delivered => Outcome::Delivered,
            Outcome::Retry {
                status,
                retry_after,
                throttled,
                message,
            } => Outcome::Retry {
                status,
                retry_after: retry_after.filter(|_| !elsewhere),
                throttled: throttled && !elsewhere,
                message: format!("{endpoint}: {message}"),
            },
            Outcome::Failed { status, message } => Outcome::Failed {
                status,
                message: format!("{endpoint}: {message}"),
            },
            filtered @ Outcome::Filtered { .. } => filtered,
        }
    }

    fn gauge(&self, name: &'static str, index: usize, value: f64) {
        metrics::gauge!(
            name,
            "destination" => self.name.clone(),
            "endpoint" => self.labels[index].clone(),
        )
        .set(value);
    }

    /// Sets every endpoint's gauges, at most once per [`GAUGES_EVERY`].
    fn refresh_gauges(&self, balancer: &Balancer) {
        let now = Instant::now();
        {
            let mut last = self
                .gauges_set
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if last.is_some_and(|at| now.duration_since(at) < GAUGES_EVERY) {
                return;
            }
            *last = Some(now);
        }
        for (index, endpoint) in balancer.endpoints(now).iter().enumerate() {
            self.gauge(
                "switchyard_endpoint_in_flight",
                index,
                endpoint.in_flight as f64,
            );
            self.gauge("switchyard_endpoint_error_rate", index, endpoint.error_rate);
        }
    }
}

/// How each endpoint is named in metric labels and messages: scheme, host and port only
/// (paths and queries carry tokens), with `#N` (its place in `urls`) where two would look
/// the same.
fn labels(urls: &[Url]) -> Vec<String> {
    let shown: Vec<String> = urls.iter().map(|url| redact::url(url.as_str())).collect();
    shown
        .iter()
        .enumerate()
        .map(|(index, label)| {
            if shown.iter().filter(|other| *other == label).count() > 1 {
                format!("{label}#{index}")
            } else {
                label.clone()
            }
        })
        .collect()
}

/// What an endpoint's answer means: the batch's outcome, what the balancer learns, and the
/// `outcome` label of `switchyard_endpoint_requests_total`.
fn judge(result: Result<HttpResponse, SendError>) -> (Outcome, Report, &'static str) {
    match result {
        Ok(response) => {
            let outcome = classify_status(&response);
            let (answer, label) = match response.status {
                200..=299 => (Answer::Success, "success"),
                429 => (Answer::Throttled, "throttled"),
                408 | 500..=599 => (Answer::Failure, "server_error"),
                _ => (Answer::Other, "client_error"),
            };
            let report = Report {
                answer,
                utilization: utilization(&response),
                pause: response.retry_after(),
            };
            (outcome, report, label)
        }
        Err(error @ SendError::Timeout(_)) => {
            (error.outcome(), Report::new(Answer::Failure), "timeout")
        }
        Err(error @ SendError::Connect(_)) => (
            error.outcome(),
            Report::new(Answer::Failure),
            "connection_error",
        ),
        // Refused by the address policy: nothing learned about the endpoint.
        Err(error @ SendError::Refused(_)) => {
            (error.outcome(), Report::new(Answer::Other), "refused")
        }
    }
}

/// `X-Server-Utilization`, when present and a number.
fn utilization(response: &HttpResponse) -> Option<f64> {
    response
        .headers
        .get(balancer::UTILIZATION_HEADER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|u| u.is_finite())
}

impl Destination for Webhook {
    fn deliver<'a>(
        &'a self,
        ctx: &'a DeliveryContext<'a>,
        events: &'a [Event],
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(async move {
            if let Some(balancer) = &self.balancer {
                return self.deliver_balanced(balancer, ctx, events).await;
            }
            let request = self.request(&self.urls[0], events);
            match ctx.http.send(request).await {
                Ok(response) => Verdict::All(classify_status(&response)),
                Err(error) => Verdict::All(error.outcome()),
            }
        })
    }

    fn endpoints(&self) -> Vec<EndpointStats> {
        self.balancer
            .as_ref()
            .map(|balancer| balancer.endpoints(Instant::now()))
            .unwrap_or_default()
    }

    fn learned(&self) -> Option<&(dyn Any + Send + Sync)> {
        self.balancer
            .as_deref()
            .map(|balancer| balancer as &(dyn Any + Send + Sync))
    }

    /// What the previous balancer learned about each endpoint carries over; the endpoints it
    /// did not have start on probation and ramp up.
    fn take_over(&self, previous: &dyn Destination) {
        let learned = previous
            .learned()
            .and_then(|l| l.downcast_ref::<Balancer>());
        if let (Some(balancer), Some(learned)) = (&self.balancer, learned) {
            balancer.take_over(learned, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An event as the engine hands it over (also for `signing`'s tests).
    pub(super) fn event(id: &str, json: &str) -> Event {
        Event {
            message_id: id.into(),
            payload: serde_json::value::RawValue::from_string(json.into()).unwrap(),
            source: None,
        }
    }

    #[test]
    fn bad_balancing_settings_are_reported_by_key() {
        let table: toml::Table = toml::from_str(
            "urls = ['http://a.example/in', 'http://a.example/in']\nbalance = 'random'\n\
             use_utilization = 'yes'\nramp_up = 'soon'\nstats_decay = '0s'",
        )
        .unwrap();
        let settings = Settings {
            name: "w",
            table: &table,
            endpoint: None,
        };
        let errors = build(&settings).err().unwrap();
        let keys: Vec<_> = errors.iter().filter_map(|e| e.key.as_deref()).collect();
        assert_eq!(
            keys,
            [
                "use_utilization",
                "urls",
                "balance",
                "ramp_up",
                "stats_decay"
            ],
            "{errors:?}"
        );
        assert!(errors[1].message.contains("listed twice"), "{errors:?}");
    }

    /// Answers 503 with `Retry-After` from `http://down.example`, 200 from anywhere else.
    struct Replicas {
        sent_to: Mutex<Vec<String>>,
    }

    impl crate::destination::HttpSender for Replicas {
        fn send(&self, request: HttpRequest) -> BoxFuture<'_, Result<HttpResponse, SendError>> {
            let host = request.url.host_str().unwrap_or_default().to_owned();
            self.sent_to.lock().unwrap().push(host.clone());
            let mut headers = HeaderMap::new();
            let status = if host == "down.example" {
                headers.insert("retry-after", HeaderValue::from_static("30"));
                503
            } else {
                headers.insert(
                    balancer::UTILIZATION_HEADER,
                    HeaderValue::from_static("0.25"),
                );
                200
            };
            Box::pin(async move {
                Ok(HttpResponse {
                    status,
                    headers,
                    body: bytes::Bytes::from_static(b"{}"),
                })
            })
        }
    }

    #[tokio::test]
    async fn a_failed_endpoint_is_named_and_the_retry_goes_elsewhere() {
        let table: toml::Table =
            toml::from_str("urls = ['http://down.example/in', 'http://up.example/in']").unwrap();
        let settings = Settings {
            name: "unit-balanced-webhook",
            table: &table,
            endpoint: None,
        };
        let plugin = build(&settings).ok().unwrap().plugin;
        let sender = Replicas {
            sent_to: Mutex::new(Vec::new()),
        };
        let ctx = DeliveryContext { http: &sender };
        let mut retried = None;
        for i in 0..50 {
            let events = [event(&format!("m{i}"), "{}")];
            if let Verdict::All(outcome @ Outcome::Retry { .. }) =
                plugin.deliver(&ctx, &events).await
            {
                retried = Some((events, outcome));
                break;
            }
        }
        let (events, outcome) = retried.expect("the down endpoint was tried once");
        assert_eq!(
            outcome,
            Outcome::Retry {
                status: Some(503),
                retry_after: None,
                throttled: false,
                message: "http://down.example/***: HTTP 503: {}".into(),
            },
            "another endpoint is up: no pause for the destination"
        );
        assert_eq!(
            plugin.deliver(&ctx, &events).await,
            Verdict::All(Outcome::Delivered)
        );
        assert_eq!(sender.sent_to.lock().unwrap().last().unwrap(), "up.example");
        let stats = plugin.endpoints();
        assert_eq!(stats.len(), 2);
        assert_eq!((stats[0].failures, stats[0].in_flight), (1, 0), "{stats:?}");
        assert_eq!(stats[1].utilization, Some(0.25), "{stats:?}");
    }

    #[test]
    fn a_reload_keeps_what_was_learned_and_ramps_up_added_endpoints() {
        let build_with = |urls: &str| {
            let table: toml::Table = toml::from_str(&format!("urls = {urls}")).unwrap();
            let settings = Settings {
                name: "unit-reloaded-webhook",
                table: &table,
                endpoint: None,
            };
            build(&settings).ok().unwrap().plugin
        };
        let first = build_with("['http://a.example/', 'http://b.example/']");
        assert!(first
            .endpoints()
            .iter()
            .all(|e| e.weight == 1.0 && !e.probation));
        let second = build_with("['http://a.example/', 'http://b.example/', 'http://c.example/']");
        second.take_over(&*first);
        let stats = second.endpoints();
        assert!(stats[2].probation && stats[2].weight < 0.2, "{stats:?}");
        assert!(!stats[0].probation && stats[0].weight == 1.0, "{stats:?}");
    }

    #[test]
    fn bad_settings_are_reported_by_key() {
        let table: toml::Table =
            toml::from_str("url = 'ftp://x'\nsecret = 'nope'\nretries = 3").unwrap();
        let settings = Settings {
            name: "w",
            table: &table,
            endpoint: None,
        };
        let errors = build(&settings).err().unwrap();
        let keys: Vec<_> = errors.iter().filter_map(|e| e.key.as_deref()).collect();
        assert_eq!(keys, ["retries", "url", "secret"], "{errors:?}");
    }
}
