//! The config reader's tests: every key, every error and where it is reported.

use super::*;
use crate::destinations;

fn errors(text: &str) -> Vec<String> {
    match parse(text, "switchyard.toml") {
        Ok(_) => Vec::new(),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

fn destination(text: &str) -> DestinationConfig {
    let config = parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    config
        .destinations
        .into_iter()
        .next()
        .expect("one destination")
}

#[test]
fn the_smallest_file_gets_the_documented_defaults() {
    let text = r#"
[[sources]]
name = "web"
write_key = "wk_web_123"

[[destinations]]
name = "orders"
kind = "webhook"
url = "http://127.0.0.1:9000/in"
"#;
    let config = parse(text, "t.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.sources.len(), 1);
    assert_eq!(config.sources[0].name, "web");
    assert_eq!(config.sources[0].write_key, "wk_web_123");
    let [orders] = &config.destinations[..] else {
        panic!("one destination expected");
    };
    assert_eq!(orders.name, "orders");
    assert_eq!(orders.kind, "webhook");
    assert_eq!(orders.sources, None);
    assert_eq!(orders.events, None);
    assert_eq!(orders.rate_limit, None);
    assert_eq!(orders.rate_limit_key, "orders");
    assert_eq!(orders.max_in_flight, 32);
    assert_eq!(orders.batch_size, 1);
    assert_eq!(orders.timeout, Duration::from_secs(10));
    assert_eq!(orders.retry, RetryPolicy::default());
    assert_eq!(orders.ordering, Ordering::None);
    assert_eq!(orders.endpoint, None);
    assert!(orders.enabled);
    assert_eq!(config.limits, LimitsConfig::default());
    assert_eq!(config.limits.max_concurrent_deliveries, 512);
    assert_eq!(config.security, SecurityConfig::default());
}

#[test]
fn an_empty_file_is_an_empty_config() {
    let config = parse("", "t.toml").unwrap_or_else(|e| panic!("{e}"));
    assert!(config.sources.is_empty() && config.destinations.is_empty());
}

#[test]
fn every_error_is_reported_where_it_is() {
    let text = r#"colour = "blue"

[[sources]]
name = "web"
write_key = "wk_web"

[[destinations]]
name = "orders"
kind = "webhook"
url = "ftp://example.com/in"
retries = 3
rate_limit = "5 per s"
sources = ["web", "app"]

[[destinations]]
name = "orders"
kind = "carrier-pigeon"
timeout = "soon"
"#;
    let known: Vec<&str> = destinations::KINDS.iter().map(|k| k.name).collect();
    let unknown_kind = format!(
        "switchyard.toml:17:8: unknown kind `carrier-pigeon` (known: {})",
        known.join(", ")
    );
    assert_eq!(
        errors(text),
        [
            "switchyard.toml:1:1: unknown key `colour` \
             (allowed: sources, destinations, limits, security, server, archive)",
            "switchyard.toml:10:1: `url`: `ftp://example.com/***` must be an http:// or https:// URL",
            "switchyard.toml:11:1: unknown key `retries` for a `webhook` destination \
             (expected one of `url`, `urls`, `secret`, `headers`, `balance`, \
             `use_utilization`, `ramp_up`, `stats_decay`, or a key every destination takes)",
            "switchyard.toml:12:14: bad rate `5 per s`: expected \"N/s\", \"N/m\" or \"N/h\"",
            "switchyard.toml:13:19: unknown source `app`",
            "switchyard.toml:16:8: duplicate destination name `orders`",
            &unknown_kind,
            "switchyard.toml:18:11: bad duration `soon`: expected number at 0",
        ]
    );
}

#[test]
fn missing_and_ill_typed_keys_are_located() {
    let text = r#"[[sources]]
write_key = "wk"

[[sources]]
name = "app"
write_key = "wk"

[[destinations]]
kind = "webhook"
url = "http://localhost/in"
max_in_flight = "many"
batch_size = 0
retry = { max_attempts = 3, jitter = true }

[limits]
max_queued = -1

[security]
deny_private_networks = "yes"
"#;
    assert_eq!(
        errors(text),
        [
            "switchyard.toml:1:1: missing key `name`",
            "switchyard.toml:6:13: duplicate write_key: another source uses it",
            "switchyard.toml:8:1: missing key `name`",
            "switchyard.toml:11:17: `max_in_flight` must be an integer",
            "switchyard.toml:12:14: `batch_size` must be at least 1",
            "switchyard.toml:13:29: unknown key `retry.jitter` \
             (allowed: max_attempts, max_age, initial_backoff, max_backoff)",
            "switchyard.toml:16:14: `limits.max_queued` must be at least 1",
            "switchyard.toml:19:25: `security.deny_private_networks` must be a boolean",
        ]
    );
}

#[test]
fn dotted_retry_keys_are_the_retry_table() {
    let orders = destination(
        r#"
[[destinations]]
name = "orders"
kind = "webhook"
url = "http://localhost/in"
retry.max_attempts = 3
retry.max_backoff = "30s"
"#,
    );
    let expected = RetryPolicy {
        max_attempts: 3,
        max_backoff: Duration::from_secs(30),
        ..RetryPolicy::default()
    };
    assert_eq!(orders.retry, expected);

    let text = "[[destinations]]\nname = \"o\"\nkind = \"webhook\"\nurl = \"http://x/\"\n\
                retry.max_attempts = 0\nretry.tries = 2\nretry.initial_backoff = \"1h\"\n";
    assert_eq!(
        errors(text),
        [
            "switchyard.toml:5:22: `retry.max_attempts` must be at least 1",
            "switchyard.toml:6:7: unknown key `retry.tries` \
             (allowed: max_attempts, max_age, initial_backoff, max_backoff)",
            "switchyard.toml:7:25: `retry.initial_backoff` (1h) is longer than \
             `retry.max_backoff` (10m)",
        ]
    );
}

#[test]
fn batch_size_is_capped_at_the_kind_maximum() {
    let orders = destination(
        r#"
[[destinations]]
name = "orders"
kind = "webhook"
url = "http://localhost/in"
batch_size = 5000
"#,
    );
    assert_eq!(orders.batch_size, 1000, "webhook's max_batch_size");
}

#[test]
fn common_keys_are_read() {
    let orders = destination(
        r#"
[[sources]]
name = "web"
write_key = "wk"

[[destinations]]
name = "orders"
kind = "webhook"
url = "http://localhost/in"
sources = ["web"]
events = ["Order Completed", "identify"]
rate_limit = "100/m"
rate_limit_key = "shared"
max_in_flight = 4
timeout = "500ms"
ordering = "per_user"
endpoint = "https://api.example.com"
enabled = false
"#,
    );
    assert_eq!(orders.sources, Some(vec!["web".to_owned()]));
    assert_eq!(
        orders.events,
        Some(vec!["Order Completed".to_owned(), "identify".to_owned()])
    );
    let per_minute = RateLimit {
        requests: 100,
        per: Duration::from_secs(60),
    };
    assert_eq!(orders.rate_limit, Some(per_minute));
    assert_eq!(orders.rate_limit_key, "shared");
    assert_eq!(orders.max_in_flight, 4);
    assert_eq!(orders.timeout, Duration::from_millis(500));
    assert_eq!(orders.ordering, Ordering::PerUser);
    assert_eq!(
        orders.endpoint.as_ref().map(Url::as_str),
        Some("https://api.example.com/")
    );
    assert!(!orders.enabled);
}

#[test]
fn browser_and_server_keys_are_read_and_located() {
    let text = r#"
[[sources]]
name = "web"
write_key = "wk"
allowed_origins = ["https://Shop.example/", "shop.example"]

[server]
public_url = "ftp://events.example.com"
trusted_proxies = ["10.0.0.0/8"]
event_trail = -1

[security]
ca_file = "no-such-file.pem"
"#;
    let found = errors(text);
    assert_eq!(found.len(), 4, "{found:?}");
    assert!(found[0].starts_with("switchyard.toml:5:45: `allowed_origins`: `shop.example`"));
    assert!(found[1].starts_with("switchyard.toml:8:14: `public_url` must be"));
    assert_eq!(
        found[2],
        "switchyard.toml:10:15: `server.event_trail` must be 0 (off) to 10000000 events, not -1"
    );
    assert!(found[3].starts_with("switchyard.toml:13:11: `ca_file`: cannot read"));
    assert!(errors(&text.replace("-1", "\"many\""))[2].contains("event_trail"));
    assert!(errors(&text.replace("-1", "10000001"))[2].contains("event_trail"));
    let default = parse(
        "[[sources]]\nname = \"web\"\nwrite_key = \"wk\"\n",
        "switchyard.toml",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(default.server.event_trail, 50_000);
    let good = text
        .replace(", \"shop.example\"", "")
        .replace("ftp://", "https://")
        .replace("event_trail = -1", "event_trail = 0")
        .replace("ca_file = \"no-such-file.pem\"", "");
    let config = parse(&good, "switchyard.toml").unwrap_or_else(|e| panic!("{e}"));
    assert!(config.sources[0]
        .allowed_origins
        .allows("https://shop.example"));
    assert!(!config.sources[0]
        .allowed_origins
        .allows("https://other.example"));
    let server = &config.server;
    assert_eq!(
        server.public_url.as_ref().unwrap().as_str(),
        "https://events.example.com/"
    );
    assert_eq!(
        server.trusted_proxies,
        ["10.0.0.0/8".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(server.event_trail, 0);
}

#[test]
fn environment_references_are_expanded_or_located() {
    // PATH is set wherever tests run; the other name is nowhere.
    let path = std::env::var("PATH").unwrap();
    let text = "[[sources]]\nname = \"web\"\nwrite_key = \"wk_${PATH}\"\n\
                [[destinations]]\nname = \"d\"\nkind = \"webhook\"\n\
                url = \"http://127.0.0.1:9/in\"\nheaders = { x = \"$${PATH}\" }\n";
    let config = parse(text, "switchyard.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.sources[0].write_key, format!("wk_{path}"));
    let unset = text.replace("wk_${PATH}", "wk_${SWITCHYARD_SURELY_UNSET_42}");
    assert_eq!(
        errors(&unset),
        ["switchyard.toml:3:17: environment variable `SWITCHYARD_SURELY_UNSET_42` is not set"]
    );
}

#[test]
fn filter_keys_are_read_and_their_errors_located() {
    let dir = std::env::temp_dir().join(format!("switchyard-filters-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("ok.js"),
        "function transformEvent(e) { return e; }",
    )
    .unwrap();
    std::fs::write(dir.join("bad.js"), "function transformEvent(e) { return e;").unwrap();
    let file = dir.join("switchyard.toml");
    let text = r#"[[destinations]]
name = "d"
kind = "webhook"
url = "http://127.0.0.1:9/in"
where = "type = 'track' and properties.revenue > 100"
consent = ["Advertising"]
sample = 0.5
drop_properties = ["context.ip"]
allow_properties = ["revenue"]
transform = "ok.js"
transform_timeout = "20ms"
"#;
    std::fs::write(&file, text).unwrap();
    let config = load(&file).unwrap_or_else(|e| panic!("{e}"));
    let d = &config.destinations[0];
    assert_eq!(
        d.gate.condition.as_ref().unwrap().text,
        "type = 'track' and properties.revenue > 100"
    );
    assert_eq!(d.gate.consent, ["Advertising"]);
    assert_eq!(d.gate.sample, Some(0.5));
    assert_eq!(
        d.shaping.drop,
        [vec!["context".to_owned(), "ip".to_owned()]]
    );
    assert_eq!(d.shaping.allow, Some(vec!["revenue".to_owned()]));
    assert!(d.shaping.transform.is_some());

    let bad = r#"[[destinations]]
name = "d"
kind = "webhook"
url = "http://127.0.0.1:9/in"
where = "type = 'track' and"
sample = 1.5
drop_properties = ["a..b"]
transform = "bad.js"
[[destinations]]
name = "e"
kind = "webhook"
url = "http://127.0.0.1:9/in"
where = "frobnicate(event) = 1"
[[destinations]]
name = "f"
kind = "webhook"
url = "http://127.0.0.1:9/in"
where = 'match(event, "x") or contains(\'
"#;
    std::fs::write(&file, bad).unwrap();
    let errors: Vec<String> = load(&file)
        .expect_err("errors")
        .0
        .iter()
        .map(ToString::to_string)
        .collect();
    let name = file.display();
    assert_eq!(errors.len(), 6, "{errors:?}");
    assert_eq!(
        errors[0],
        format!(
            "{name}:5:28: `where`: the expression ends where a value, a field or `(` was expected"
        )
    );
    assert_eq!(
        errors[1],
        format!("{name}:6:10: `sample` must be a number from 0 to 1")
    );
    assert!(errors[2].starts_with(&format!("{name}:7:20: `drop_properties`: `a..b`")));
    assert!(
        errors[3].starts_with(&format!(
            "{name}:8:13: `transform`: {}",
            dir.join("bad.js").display()
        )),
        "{}",
        errors[3]
    );
    assert!(errors[3].contains("SyntaxError"), "{}", errors[3]);
    assert!(errors[4].starts_with(&format!(
        "{name}:13:10: `where`: unknown function `frobnicate`"
    )));
    assert!(
        errors[5].starts_with(&format!("{name}:18:40: `where`: `\\` at the end")),
        "{}",
        errors[5]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_syntax_error_is_located() {
    let text = "[[sources]]\nname = \"web\nwrite_key = \"wk\"\n";
    assert_eq!(errors(text), ["switchyard.toml:2:12: invalid basic string"]);
}

#[test]
fn columns_count_characters() {
    let text = "[[sources]]\nname = \"wéb\"\nwrite_key = \"wk\"\nbogus = 1 # «x»\n\
                [[sources]]\nname = \"wéb\"\n   write_key = \"k2\"";
    assert_eq!(
        errors(text),
        [
            "switchyard.toml:4:1: unknown key `bogus` (allowed: name, write_key, allowed_origins)",
            "switchyard.toml:6:8: duplicate source name `wéb`",
        ]
    );
}

#[test]
fn an_unreadable_file_is_one_error() {
    let path = Path::new("/nonexistent/switchyard.toml");
    let errors = load(path).expect_err("an error");
    assert_eq!(errors.0.len(), 1);
    assert_eq!((errors.0[0].line, errors.0[0].col), (1, 1));
    assert!(errors.0[0]
        .message
        .starts_with("cannot read the config file"));
}

#[test]
fn rates() {
    let rate = |requests, seconds| RateLimit {
        requests,
        per: Duration::from_secs(seconds),
    };
    assert_eq!(parse_rate("10/s"), Ok(rate(10, 1)));
    assert_eq!(parse_rate("600/m"), Ok(rate(600, 60)));
    assert_eq!(parse_rate("1/h"), Ok(rate(1, 3600)));
    for bad in [
        "", "10", "10/d", "/s", "+5/s", "5 /s", "5/sec", "-1/s", "1.5/s",
    ] {
        assert_eq!(
            parse_rate(bad),
            Err(format!(
                "bad rate `{bad}`: expected \"N/s\", \"N/m\" or \"N/h\""
            ))
        );
    }
    assert!(parse_rate("0/s").is_err());
    assert!(parse_rate("99999999999/s").is_err());
}

#[test]
fn durations() {
    assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
    assert_eq!(parse_duration("4h"), Ok(Duration::from_secs(4 * 3600)));
    assert_eq!(
        parse_duration("0s"),
        Err("bad duration `0s`: must be longer than zero".to_owned())
    );
    assert!(parse_duration("10").is_err());
    assert!(parse_duration("soon").is_err());
}

// `limits.max_concurrent_deliveries = 9223372036854775807` passed `switchyard check`, then
// `serve` panicked at start: a semaphore cannot count that many permits.
#[test]
fn concurrency_past_a_hundred_thousand_is_refused_where_it_is_written() {
    let text = r#"
[limits]
max_concurrent_deliveries = 9223372036854775807

[[sources]]
name = "app"
write_key = "wk_app_1"

[[destinations]]
name = "hook"
kind = "webhook"
url = "http://127.0.0.1:9000/hook"
max_in_flight = 100001
"#;
    assert_eq!(
        errors(text),
        [
            "switchyard.toml:3:29: `limits.max_concurrent_deliveries` must be at most 100000",
            "switchyard.toml:13:17: `max_in_flight` must be at most 100000",
        ]
    );
    let fine = text
        .replace("9223372036854775807", "100000")
        .replace("100001", "100000");
    assert_eq!(errors(&fine), Vec::<String>::new());
}

// A duration past any calendar passed `switchyard check`, and a destination with
// `timeout = "5000000000d"` then made every claim fail ("timestamp out of range"): no
// destination got anything. Such durations are refused where they are written.
#[test]
fn durations_past_a_hundred_years_are_refused_where_they_are_written() {
    let text = r#"
[archive]
retention = "3000000000d"

[[sources]]
name = "web"
write_key = "wk_web_123"

[[destinations]]
name = "down"
kind = "webhook"
url = "http://127.0.0.1:9001/in"
timeout = "5000000000d"
retry = { max_age = "101y", max_backoff = "36600d" }
"#;
    assert_eq!(
        errors(text),
        [
            "switchyard.toml:3:13: bad duration `3000000000d`: longer than 100 years",
            "switchyard.toml:13:11: bad duration `5000000000d`: longer than 100 years",
            "switchyard.toml:14:21: bad duration `101y`: longer than 100 years",
            "switchyard.toml:14:43: bad duration `36600d`: longer than 100 years",
        ]
    );
    assert_eq!(parse_duration("36500d"), Ok(MAX_DURATION));
    assert_eq!(parse_duration_or_zero("0s"), Ok(Duration::ZERO));
}
