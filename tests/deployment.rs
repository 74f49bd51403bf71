//! Real deployments: Postgres that demands TLS (a private cluster with a CA made here),
//! credentials from the environment, and the metric series alerts need before any traffic.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use switchyard::testkit::{start_switchyard, MockServer, PrivateCluster, Reply, TestDatabase};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

fn openssl(dir: &Path, args: &str) {
    let status = Command::new("sh")
        .current_dir(dir)
        .args(["-c", &format!("openssl {args} 2>/dev/null")])
        .status()
        .expect("openssl runs");
    assert!(status.success(), "openssl {args}");
}

/// A CA, and a server certificate it signed for 127.0.0.1 and localhost; plus a second CA that
/// signed nothing.
fn make_certificates(dir: &Path) {
    openssl(
        dir,
        "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=test-ca -keyout ca.key -out ca.pem",
    );
    openssl(dir, "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=other-ca -keyout other.key -out other.pem");
    openssl(
        dir,
        "req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout server.key -out server.csr",
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(dir, "x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile san.ext -out server.pem");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        dir.join("server.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

fn migrate(url: &str) -> (bool, String) {
    let output = Command::new(BIN)
        .args(["migrate", "--database-url", url])
        .env("RUST_LOG", "error")
        .output()
        .expect("switchyard runs");
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.success(), text)
}

#[tokio::test]
async fn postgres_over_tls_is_verified_against_the_given_ca() {
    let certs = std::env::temp_dir().join(format!("sy-tls-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&certs).unwrap();
    make_certificates(&certs);
    let copied: PathBuf = certs.clone();
    let cluster = PrivateCluster::start_with(
        &[
            ("ssl", "on"),
            ("ssl_cert_file", "../server.pem"),
            ("ssl_key_file", "../server.key"),
        ],
        move |dir| {
            for file in ["server.pem", "server.key"] {
                std::fs::copy(copied.join(file), dir.join(file)).unwrap();
            }
        },
    );
    let ca = certs.join("ca.pem").display().to_string();
    let other = certs.join("other.pem").display().to_string();
    let base = cluster.url("tls_app");

    let (ok, log) = migrate(&format!("{base}?sslmode=verify-full&sslrootcert={ca}"));
    assert!(ok, "verify-full with the CA: {log}");
    let (ok, log) = migrate(&format!("{base}?sslmode=verify-full"));
    assert!(!ok, "verify-full without the CA must fail");
    assert!(log.contains("does not verify"), "{log}");
    assert!(
        log.ends_with('\n') && log.matches("switchyard:").count() == 1,
        "{log}"
    );
    let (ok, _) = migrate(&format!("{base}?sslmode=verify-full&sslrootcert={other}"));
    assert!(!ok, "verify-full with another CA must fail");
    let (ok, log) = migrate(&format!("{base}?sslmode=require"));
    assert!(ok, "require encrypts without verifying: {log}");

    // The same URL form works for the postgres destination, and the rows travel over TLS.
    let db = TestDatabase::create("tls_destination").await;
    let warehouse = format!("{base}?sslmode=verify-full&sslrootcert={ca}");
    let config = format!(
        r#"
[[sources]]
name = "web"
write_key = "wk_tls"

[[destinations]]
name = "warehouse"
kind = "postgres"
url = "{warehouse}"
table = "events_tls"
"#
    );
    let sy = start_switchyard(&config, &db.url).await;
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/track", sy.addr))
        .basic_auth("wk_tls", Some(""))
        .json(&json!({"event": "Paid", "userId": "u1", "messageId": "tls-1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    use sqlx::Connection as _;
    let mut check = sqlx::PgConnection::connect(&warehouse).await.unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&mut check)
        .await
        .unwrap();
    assert!(ssl, "the connection is encrypted");
    let mut rows = 0i64;
    for _ in 0..100 {
        rows = sqlx::query_scalar("SELECT count(*) FROM events_tls")
            .fetch_one(&mut check)
            .await
            .unwrap_or(0);
        if rows > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(rows, 1, "the event reached the TLS warehouse");
    sy.shutdown().await.unwrap();
    drop(cluster);
    let _ = std::fs::remove_dir_all(&certs);
}

#[test]
fn check_reads_credentials_from_the_environment_and_locates_unset_ones() {
    let dir = std::env::temp_dir().join(format!("sy-env-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("switchyard.toml");
    std::fs::write(
        &file,
        "[[sources]]\nname = \"web\"\nwrite_key = \"${WEB_WRITE_KEY}\"\n\n\
         [[destinations]]\nname = \"amp\"\nkind = \"amplitude\"\napi_key = \"${AMPLITUDE_API_KEY}\"\n",
    )
    .unwrap();
    let check = |env: &[(&str, &str)]| {
        let mut command = Command::new(BIN);
        command
            .arg("check")
            .arg(&file)
            .env_remove("WEB_WRITE_KEY")
            .env_remove("AMPLITUDE_API_KEY");
        for (name, value) in env {
            command.env(name, value);
        }
        command.output().unwrap()
    };
    let output = check(&[("WEB_WRITE_KEY", "wk_from_env")]);
    assert_eq!(output.status.code(), Some(2));
    let printed = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        printed,
        format!(
            "{}:8:12: environment variable `AMPLITUDE_API_KEY` is not set\n",
            file.display()
        )
    );
    let output = check(&[("WEB_WRITE_KEY", "wk"), ("AMPLITUDE_API_KEY", "k")]);
    assert_eq!(output.status.code(), Some(0), "{output:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn every_series_exists_before_the_first_event() {
    let db = TestDatabase::create("series").await;
    let sink = MockServer::scripted(|_, _| Reply::status(400)).await;
    let config = format!(
        r#"
[[sources]]
name = "series-web"
write_key = "wk_series"

[[destinations]]
name = "series-hook"
kind = "webhook"
url = "{}"
"#,
        sink.url("/in")
    );
    let sy = start_switchyard(&config, &db.url).await;
    let scrape = || async {
        reqwest::get(format!("http://{}/metrics", sy.addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let text = scrape().await;
    let has = |text: &str, series: &str| text.lines().any(|line| line.starts_with(series));
    for series in [
        "switchyard_ingested_events_total{source=\"series-web\"} 0",
        "switchyard_rejected_events_total{source=\"series-web\",code=\"invalid_message\"} 0",
        "switchyard_deliveries_total{destination=\"series-hook\",outcome=\"delivered\"} 0",
        "switchyard_deliveries_total{destination=\"series-hook\",outcome=\"retried\"} 0",
        "switchyard_deliveries_total{destination=\"series-hook\",outcome=\"dead\"} 0",
        "switchyard_rate_limited_total{destination=\"series-hook\"} 0",
        "switchyard_queue_depth{destination=\"series-hook\"} 0",
        "switchyard_delivery_latency_seconds_count{destination=\"series-hook\"} 0",
        "switchyard_in_flight{destination=\"series-hook\"} 0",
        "switchyard_dead_letters{destination=\"series-hook\"} 0",
        "switchyard_oldest_queued_age_seconds{destination=\"series-hook\"} 0",
        "switchyard_build_info{version=",
    ] {
        assert!(has(&text, series), "no `{series}` in:\n{text}");
    }

    // A 400 dead-letters at once: the gauge follows.
    let response = reqwest::Client::new()
        .post(format!("http://{}/v1/track", sy.addr))
        .basic_auth("wk_series", Some(""))
        .json(&json!({"event": "E", "userId": "u"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    for _ in 0..100 {
        text = scrape().await;
        if has(
            &text,
            "switchyard_dead_letters{destination=\"series-hook\"} 1",
        ) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        has(
            &text,
            "switchyard_dead_letters{destination=\"series-hook\"} 1"
        ),
        "{text}"
    );
    sy.shutdown().await.unwrap();
}

#[test]
fn the_reference_example_is_a_valid_config() {
    let reference = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
    )
    .unwrap();
    let example = reference
        .rsplit("```toml\n")
        .next()
        .and_then(|tail| tail.split("```").next())
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sy-ref-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    openssl(&dir, "req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=internal -keyout k.pem -out internal-ca.pem");
    let file = dir.join("switchyard.toml");
    std::fs::write(&file, example).unwrap();
    let mut command = Command::new(BIN);
    command.arg("check").arg(&file);
    for name in [
        "WEB_WRITE_KEY",
        "BACKEND_WRITE_KEY",
        "ORDERS_WEBHOOK_SECRET",
        "AMPLITUDE_API_KEY",
        "WAREHOUSE_PASSWORD",
    ] {
        command.env(name, format!("value-of-{name}"));
    }
    command.env(
        "ORDERS_WEBHOOK_SECRET",
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    );
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An HTTPS receiver (Python's http.server over TLS) with a certificate of the test CA; it
/// answers 200 to every POST. Killed on drop.
struct HttpsReceiver {
    child: std::process::Child,
    port: u16,
}

impl HttpsReceiver {
    fn start(certs: &Path) -> HttpsReceiver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let script = format!(
            r#"
import http.server, ssl
class Ok(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", {port}), Ok)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain("{dir}/server.pem", "{dir}/server.key")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#,
            dir = certs.display()
        );
        let child = Command::new("python3")
            .args(["-c", &script])
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        HttpsReceiver { child, port }
    }
}

impl Drop for HttpsReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn outbound_https_trusts_the_ca_file_besides_the_system_store() {
    let certs = std::env::temp_dir().join(format!("sy-ca-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&certs).unwrap();
    make_certificates(&certs);
    let receiver = HttpsReceiver::start(&certs);
    let config = |security: &str| {
        format!(
            r#"
[[sources]]
name = "web"
write_key = "wk_https"

[[destinations]]
name = "internal"
kind = "webhook"
url = "https://127.0.0.1:{}/in"
retry.initial_backoff = "5s"

{security}
"#,
            receiver.port
        )
    };
    let status = |addr: std::net::SocketAddr| async move {
        let http = reqwest::Client::new();
        let response = http
            .post(format!("http://{addr}/v1/track"))
            .basic_auth("wk_https", Some(""))
            .json(&json!({"event": "E", "userId": "u"}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        for _ in 0..100 {
            let list: serde_json::Value = http
                .get(format!("http://{addr}/admin/v1/destinations"))
                .bearer_auth(switchyard::testkit::ADMIN_TOKEN)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let internal = list[0].clone();
            if internal["delivered"] == 1 || !internal["last_error"].is_null() {
                return internal;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no outcome");
    };

    let db = TestDatabase::create("https_untrusted").await;
    let sy = start_switchyard(&config(""), &db.url).await;
    let untrusted = status(sy.addr).await;
    assert_eq!(untrusted["delivered"], 0, "{untrusted}");
    let error = untrusted["last_error"]
        .as_str()
        .unwrap_or_default()
        .to_lowercase();
    assert!(error.contains("certificate"), "{untrusted}");
    sy.shutdown().await.unwrap();

    let db = TestDatabase::create("https_trusted").await;
    let ca_file = format!(
        "[security]\nca_file = \"{}\"",
        certs.join("ca.pem").display()
    );
    let sy = start_switchyard(&config(&ca_file), &db.url).await;
    let trusted = status(sy.addr).await;
    assert_eq!(trusted["delivered"], 1, "{trusted}");
    sy.shutdown().await.unwrap();
    drop(receiver);
    let _ = std::fs::remove_dir_all(&certs);
}
