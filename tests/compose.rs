//! `docker-compose.yml` as written, without Docker (there is no engine here): its health checks,
//! grace period and example receiver hang together, and the Switchyard service's own config and
//! environment, interpolated as Compose would, run the real binary: healthy, events reach the
//! receiver, the admin token comes from the environment, SIGTERM ends it in time.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_norway::Value;
use switchyard::testkit::{MockServer, TestDatabase};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");
/// What `switchyard serve` allows at shutdown: deliveries in flight (10 s), then open HTTP
/// requests (15 s). Compose must wait longer before it kills.
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(25);

fn repository() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Value {
    let text = std::fs::read_to_string(repository().join("docker-compose.yml")).unwrap();
    serde_norway::from_str(&text).expect("valid YAML")
}

/// Compose's interpolation: `${NAME}`, `${NAME:-default}`, `${NAME-default}`, `${NAME:?error}`,
/// `$$`.
fn interpolate(text: &str, env: &HashMap<&str, &str>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push('$');
            rest = after;
            continue;
        }
        let Some(after) = rest.strip_prefix("${") else {
            return Err(format!("unsupported reference in `{text}`"));
        };
        let end = after.find('}').ok_or("unterminated ${")?;
        let expression = &after[..end];
        rest = &after[end + 1..];
        let (name, value) = if let Some((name, default)) = expression.split_once(":-") {
            let value = env.get(name).filter(|v| !v.is_empty()).copied();
            (name, value.unwrap_or(default).to_owned())
        } else if let Some((name, error)) = expression.split_once(":?") {
            let value = env.get(name).filter(|v| !v.is_empty());
            (name, value.ok_or(format!("{name}: {error}"))?.to_string())
        } else if let Some((name, default)) = expression.split_once('-') {
            (name, env.get(name).copied().unwrap_or(default).to_owned())
        } else {
            (
                expression,
                env.get(expression).copied().unwrap_or_default().to_owned(),
            )
        };
        assert!(!name.is_empty());
        out.push_str(&value);
    }
    out.push_str(rest);
    Ok(out)
}

fn environment(
    service: &Value,
    env: &HashMap<&str, &str>,
) -> Result<HashMap<String, String>, String> {
    let map = service["environment"].as_mapping().expect("a mapping");
    map.iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                other => serde_norway::to_string(other).unwrap().trim().to_owned(),
            };
            Ok((k.as_str().unwrap().to_owned(), interpolate(&value, env)?))
        })
        .collect()
}

/// The host side of the volume mounted at `target`.
fn mounted_file(service: &Value, target: &str) -> PathBuf {
    let volume = service["volumes"]
        .as_sequence()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .find(|v| v.split(':').nth(1) == Some(target))
        .unwrap_or_else(|| panic!("something is mounted at {target}"));
    repository().join(volume.split(':').next().unwrap())
}

#[test]
fn the_services_hang_together() {
    let compose = compose();
    let services = &compose["services"];
    let switchyard = &services["switchyard"];
    let health = switchyard["healthcheck"]["test"]
        .as_sequence()
        .map(|parts| {
            parts
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    assert!(health.contains("http://127.0.0.1:8080/readyz"), "{health}");
    assert!(
        health.starts_with("CMD curl"),
        "the image has curl for it: {health}"
    );
    let dockerfile = std::fs::read_to_string(repository().join("Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(" curl"),
        "the runtime image installs curl"
    );
    let grace = switchyard["stop_grace_period"]
        .as_str()
        .expect("a stop_grace_period");
    let grace = humantime::parse_duration(grace).unwrap();
    assert!(
        grace > SHUTDOWN_BUDGET,
        "{grace:?} is not longer than {SHUTDOWN_BUDGET:?}"
    );
    assert_eq!(
        switchyard["depends_on"]["postgres"]["condition"].as_str(),
        Some("service_healthy")
    );
    assert!(!services["postgres"]["healthcheck"]["test"].is_null());

    // The admin token must come from the environment: no default to forget to change.
    let empty = HashMap::new();
    let error = environment(switchyard, &empty).unwrap_err();
    assert!(error.starts_with("SWITCHYARD_ADMIN_TOKEN"), "{error}");

    // Every destination of the config reaches a service of the file, on the port it listens on.
    let env: HashMap<&str, &str> = [("SWITCHYARD_ADMIN_TOKEN", "t")].into();
    let config_path = &environment(switchyard, &env).unwrap()["SWITCHYARD_CONFIG"];
    let config_file = mounted_file(switchyard, config_path);
    let config: toml::Table =
        toml::from_str(&std::fs::read_to_string(&config_file).unwrap()).unwrap();
    for destination in config["destinations"].as_array().unwrap() {
        let url = url::Url::parse(destination["url"].as_str().unwrap()).unwrap();
        let host = url.host_str().unwrap();
        let service = &services[host];
        assert!(service.is_mapping(), "no `{host}` service for {url}");
        let command = serde_norway::to_string(&service["command"]).unwrap();
        let port = url.port().unwrap().to_string();
        assert!(
            command.contains(&port),
            "`{host}` does not listen on {port}: {command}"
        );
    }
}

#[tokio::test]
async fn the_compose_config_and_environment_run_without_docker() {
    let db = TestDatabase::create("compose").await;
    let sink = MockServer::start().await;
    let compose = compose();
    let switchyard = &compose["services"]["switchyard"];
    let outside: HashMap<&str, &str> = [("SWITCHYARD_ADMIN_TOKEN", "token-from-env")].into();
    let mut env = environment(switchyard, &outside).unwrap();

    // What Docker would provide: the service names resolve, the port is published.
    let config_file = mounted_file(switchyard, &env["SWITCHYARD_CONFIG"]);
    let config = std::fs::read_to_string(&config_file)
        .unwrap()
        .replace("http://sink:9000/", &sink.url("/"));
    let dir = std::env::temp_dir().join(format!("sy-compose-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let config_path = dir.join("switchyard.toml");
    std::fs::write(&config_path, config).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    assert!(env["DATABASE_URL"].contains("@postgres:5432/"));
    env.insert("DATABASE_URL".into(), db.url.clone());
    env.insert("SWITCHYARD_LISTEN".into(), format!("127.0.0.1:{port}"));
    env.insert(
        "SWITCHYARD_CONFIG".into(),
        config_path.display().to_string(),
    );

    let mut child = Command::new(BIN)
        .arg("serve")
        .envs(&env)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let started = Instant::now();
    let healthy = loop {
        let ready = http.get(format!("{base}/readyz")).send().await;
        if ready.is_ok_and(|r| r.status() == 200) {
            break true;
        }
        if started.elapsed() > Duration::from_secs(60) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(healthy, "the health check passes");

    let write_key = &env["WEB_WRITE_KEY"];
    let response = http
        .post(format!("{base}/v1/track"))
        .basic_auth(write_key, Some(""))
        .json(&serde_json::json!({"userId": "u1", "event": "Signed Up", "messageId": "compose-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let arrived = sink
        .wait_until(Duration::from_secs(20), |s| {
            s.message_ids() == ["compose-1"]
        })
        .await;
    assert!(arrived, "the receiver got the event");
    let admin = http
        .get(format!("{base}/admin/v1/destinations"))
        .bearer_auth("token-from-env")
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);

    // `docker compose stop`: SIGTERM, then SIGKILL after stop_grace_period.
    let grace =
        humantime::parse_duration(switchyard["stop_grace_period"].as_str().unwrap()).unwrap();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let stopping = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if stopping.elapsed() > grace {
            let _ = child.kill();
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM ends it cleanly within stop_grace_period: {status:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
