//! Test kit: a private database per test, a scriptable mock receiver, and an in-process
//! Switchyard. Used by `tests/` and by destination authors (see `destinations/README.md`).
//!
//! The mock records every request and answers as scripted: 200, any status with headers (a 429
//! with `Retry-After`), after a delay, or never (a hung vendor).

pub mod conformance;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use sqlx::Connection;
use tokio::sync::Notify;

use crate::cli::serve::{self, Role, Running};

/// The server every test database lives on.
pub fn server_url() -> String {
    std::env::var("SWITCHYARD_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A database of its own for one test, dropped when the value is.
pub struct TestDatabase {
    pub name: String,
    pub url: String,
}

impl TestDatabase {
    /// A fresh, empty database named after `label`.
    pub async fn create(label: &str) -> TestDatabase {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("sy_test_{}_{}", sanitize(label), &suffix[..8]);
        let mut admin = sqlx::PgConnection::connect(&format!("{}/postgres", server_url()))
            .await
            .expect("the test Postgres answers (see README: .ci/test starts it)");
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .expect("creating the test database");
        let url = format!("{}/{name}", server_url());
        TestDatabase { name, url }
    }

    /// A URL for this database that names nothing yet: Switchyard must create it.
    pub fn uncreated(label: &str) -> TestDatabase {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("sy_test_{}_{}", sanitize(label), &suffix[..8]);
        let url = format!("{}/{name}", server_url());
        TestDatabase { name, url }
    }

    /// Runs one query and returns the first column of the first row as text.
    pub async fn scalar(&self, sql: &str) -> Option<String> {
        let mut connection = sqlx::PgConnection::connect(&self.url).await.ok()?;
        sqlx::query_scalar::<_, Option<String>>(sql)
            .fetch_one(&mut connection)
            .await
            .ok()
            .flatten()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside async code: a short-lived runtime on its own thread does the work.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                if let Ok(mut admin) =
                    sqlx::PgConnection::connect(&format!("{}/postgres", server_url())).await
                {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                }
            });
            Ok::<_, std::io::Error>(())
        })
        .join();
    }
}

fn sanitize(label: &str) -> String {
    label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(24)
        .collect()
}

/// A request the mock received.
#[derive(Debug, Clone)]
pub struct Received {
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// The status the mock answered (0 while it is still answering or when it hung).
    pub status: u16,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// How the mock answers one request.
#[derive(Debug, Clone)]
pub enum Reply {
    Status {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
        delay: Duration,
    },
    /// Never answers (the connection stays open).
    Hang,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn status(status: u16) -> Reply {
        Reply::Status {
            status,
            headers: Vec::new(),
            body: r#"{"ok":true}"#.into(),
            delay: Duration::ZERO,
        }
    }

    pub fn with_header(self, name: &str, value: &str) -> Reply {
        match self {
            Reply::Status {
                status,
                mut headers,
                body,
                delay,
            } => {
                headers.push((name.into(), value.into()));
                Reply::Status {
                    status,
                    headers,
                    body,
                    delay,
                }
            }
            Reply::Hang => Reply::Hang,
        }
    }

    pub fn with_body(self, text: &str) -> Reply {
        match self {
            Reply::Status {
                status,
                headers,
                delay,
                ..
            } => Reply::Status {
                status,
                headers,
                body: text.into(),
                delay,
            },
            Reply::Hang => Reply::Hang,
        }
    }

    pub fn after(self, wait: Duration) -> Reply {
        match self {
            Reply::Status {
                status,
                headers,
                body,
                ..
            } => Reply::Status {
                status,
                headers,
                body,
                delay: wait,
            },
            Reply::Hang => Reply::Hang,
        }
    }
}

type Script = Box<dyn FnMut(usize, &Received) -> Reply + Send>;

struct MockState {
    received: Mutex<Vec<Received>>,
    script: Mutex<Script>,
    arrived: Notify,
}

/// A local HTTP receiver that records requests and answers as scripted.
#[derive(Clone)]
pub struct MockServer {
    pub addr: SocketAddr,
    state: Arc<MockState>,
}

impl MockServer {
    /// A receiver that answers 200 to everything.
    pub async fn start() -> MockServer {
        MockServer::scripted(|_, _| Reply::ok()).await
    }

    /// A receiver whose answer to the n-th request (from 1) is `script(n, request)`.
    pub async fn scripted(
        script: impl FnMut(usize, &Received) -> Reply + Send + 'static,
    ) -> MockServer {
        let state = Arc::new(MockState {
            received: Mutex::new(Vec::new()),
            script: Mutex::new(Box::new(script)),
            arrived: Notify::new(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding a loopback port");
        let addr = listener.local_addr().expect("a bound address");
        let app = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        MockServer { addr, state }
    }

    /// Changes the script from now on.
    pub fn script(&self, script: impl FnMut(usize, &Received) -> Reply + Send + 'static) {
        *self.state.script.lock().expect("script lock") = Box::new(script);
    }

    /// `http://127.0.0.1:PORT` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Every request so far.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("received lock").clone()
    }

    /// Every event in bodies answered 2xx: a body that is one event, `{"batch": [...]}`, or an
    /// array of events.
    pub fn events(&self) -> Vec<Value> {
        let mut events = Vec::new();
        for request in self.received() {
            if !(200..300).contains(&request.status) {
                continue;
            }
            match request.json() {
                Value::Object(mut body) if body.get("batch").is_some_and(Value::is_array) => {
                    if let Some(Value::Array(batch)) = body.remove("batch") {
                        events.extend(batch);
                    }
                }
                Value::Array(batch) => events.extend(batch),
                Value::Null => {}
                other => events.push(other),
            }
        }
        events
    }

    /// messageIds of [`MockServer::events`].
    pub fn message_ids(&self) -> Vec<String> {
        self.events()
            .iter()
            .filter_map(|e| e["messageId"].as_str().map(str::to_owned))
            .collect()
    }

    /// Waits until `done(self)` holds, or `limit` passes; returns whether it held.
    pub async fn wait_until(&self, limit: Duration, done: impl Fn(&MockServer) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            if done(self) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let _ = tokio::time::timeout(
                left.min(Duration::from_millis(100)),
                self.state.arrived.notified(),
            )
            .await;
        }
    }
}

async fn answer(State(state): State<Arc<MockState>>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = axum::body::to_bytes(body, 64 * 1024 * 1024)
        .await
        .unwrap_or_default();
    let body = if parts
        .headers
        .get("content-encoding")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"))
    {
        let mut out = Vec::new();
        let mut decoder = flate2::read::GzDecoder::new(&body[..]);
        match std::io::Read::read_to_end(&mut decoder, &mut out) {
            Ok(_) => Bytes::from(out),
            Err(_) => body,
        }
    } else {
        body
    };
    let mut received = Received {
        path: parts.uri.path().to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: parts.headers,
        body,
        at: Instant::now(),
        status: 0,
    };
    let (index, reply) = {
        let mut log = state.received.lock().expect("received lock");
        let index = log.len();
        let reply = (state.script.lock().expect("script lock"))(index + 1, &received);
        if let Reply::Status { status, .. } = &reply {
            received.status = *status;
        }
        // Recorded as answered once the delay (if any) has passed.
        let mut recorded = received.clone();
        if matches!(&reply, Reply::Status { delay, .. } if !delay.is_zero()) {
            recorded.status = 0;
        }
        log.push(recorded);
        (index, reply)
    };
    state.arrived.notify_waiters();
    match reply {
        Reply::Hang => {
            futures::future::pending::<()>().await;
            StatusCode::OK.into_response()
        }
        Reply::Status {
            status,
            headers,
            body,
            delay,
        } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
                if let Some(entry) = state.received.lock().expect("received lock").get_mut(index) {
                    entry.status = status;
                }
                state.arrived.notify_waiters();
            }
            let mut response = (
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                body,
            )
                .into_response();
            for (name, value) in headers {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(&value),
                ) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
    }
}

/// Starts Switchyard in this process on a free loopback port.
pub async fn start_switchyard(config_toml: &str, database_url: &str) -> Running {
    start_switchyard_as(config_toml, database_url, Role::All).await
}

/// [`start_switchyard`] with a role.
pub async fn start_switchyard_as(config_toml: &str, database_url: &str, role: Role) -> Running {
    let config = crate::config::parse(config_toml, "test.toml")
        .unwrap_or_else(|errors| panic!("test config is invalid:\n{errors}"));
    serve::start(serve::Settings {
        listen: "127.0.0.1:0".into(),
        database_url: Some(database_url.to_owned()),
        config,
        config_path: None,
        role,
        admin_token: Some(ADMIN_TOKEN.into()),
        grace: Duration::from_secs(5),
        timeouts: test_timeouts(),
    })
    .await
    .expect("switchyard starts")
}

/// Starts Switchyard in this process with its config read from `path` (so it can be reloaded).
pub async fn start_switchyard_from(path: &std::path::Path, database_url: &str) -> Running {
    let config = crate::config::load(path)
        .unwrap_or_else(|errors| panic!("test config is invalid:\n{errors}"));
    serve::start(serve::Settings {
        listen: "127.0.0.1:0".into(),
        database_url: Some(database_url.to_owned()),
        config,
        config_path: Some(path.to_owned()),
        role: Role::All,
        admin_token: Some(ADMIN_TOKEN.into()),
        grace: Duration::from_secs(5),
        timeouts: test_timeouts(),
    })
    .await
    .expect("switchyard starts")
}

/// The admin token [`start_switchyard`] uses.
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// Switchyard as a child process (`switchyard serve`), for tests that kill or signal it.
pub struct Process {
    pub addr: SocketAddr,
    child: std::process::Child,
    binary: std::path::PathBuf,
    config_path: std::path::PathBuf,
    database_url: String,
    log_path: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl Process {
    /// Writes `config_toml` next to a log file in a temp dir and starts `binary serve`.
    pub async fn spawn(binary: &str, config_toml: &str, database_url: &str) -> Process {
        Process::spawn_with(binary, config_toml, database_url, &[]).await
    }

    /// [`Process::spawn`] with extra environment variables (`SWITCHYARD_ROLE`, ...).
    pub async fn spawn_with(
        binary: &str,
        config_toml: &str,
        database_url: &str,
        env: &[(&str, &str)],
    ) -> Process {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let dir =
            std::env::temp_dir().join(format!("switchyard-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let config_path = dir.join("switchyard.toml");
        std::fs::write(&config_path, config_toml).expect("writing the config");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        let addr = listener.local_addr().expect("an address");
        drop(listener);
        let mut process = Process {
            addr,
            child: Process::launch(
                binary.as_ref(),
                &config_path,
                database_url,
                addr,
                &dir.join("switchyard.log"),
                &env,
            ),
            binary: binary.into(),
            config_path,
            database_url: database_url.into(),
            log_path: dir.join("switchyard.log"),
            env,
        };
        process.wait_ready().await;
        process
    }

    fn launch(
        binary: &std::path::Path,
        config: &std::path::Path,
        database_url: &str,
        addr: SocketAddr,
        log: &std::path::Path,
        env: &[(String, String)],
    ) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("a log file");
        std::process::Command::new(binary)
            .arg("serve")
            .env("SWITCHYARD_CONFIG", config)
            .env("SWITCHYARD_LISTEN", addr.to_string())
            .env("DATABASE_URL", database_url)
            .env("SWITCHYARD_ADMIN_TOKEN", ADMIN_TOKEN)
            .env("RUST_LOG", "info,sqlx=warn")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(log.try_clone().expect("a log handle"))
            .stderr(log)
            .spawn()
            .expect("switchyard starts")
    }

    async fn wait_ready(&mut self) {
        let url = format!("http://{}/readyz", self.addr);
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("switchyard exited with {status}:\n{}", self.log());
            }
            if let Ok(response) = client.get(&url).send().await {
                if response.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("switchyard was not ready in 30 s:\n{}", self.log());
    }

    /// The process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A number from `/proc/PID/status` (`"VmRSS:"` in kB, `"Threads:"`). Panics when it cannot
    /// be read: a measurement that silently reads zero would pass any bound.
    pub fn proc_status(&self, field: &str) -> u64 {
        let pid = self.child.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
        status
            .lines()
            .find(|l| l.starts_with(field))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
    }

    /// Its open file descriptors. Panics when `/proc/PID/fd` cannot be read.
    pub fn open_files(&self) -> usize {
        let pid = self.child.id();
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap_or_else(|e| panic!("reading /proc/{pid}/fd: {e}"))
            .count()
    }

    /// The config file it reads (rewrite it, then SIGHUP or `POST /admin/v1/reload`).
    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Starts it again (same config, database and port) after it stopped.
    pub async fn restart(&mut self) {
        self.child = Process::launch(
            &self.binary,
            &self.config_path,
            &self.database_url,
            self.addr,
            &self.log_path,
            &self.env,
        );
        self.wait_ready().await;
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `limit` for the exit; returns the exit code.
    pub async fn terminate(&mut self, limit: Duration) -> Option<i32> {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL server of the test's own (initdb into a temp dir, a free port), for tests that
/// stop the database under a running Switchyard. Runs as the `postgres` user when root.
pub struct PrivateCluster {
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    /// Extra `postgres -c` settings (`ssl=on ...`).
    settings: String,
}

impl PrivateCluster {
    /// Initializes and starts a cluster.
    pub fn start() -> PrivateCluster {
        PrivateCluster::start_with(&[], |_| ())
    }

    /// Initializes a cluster, lets `prepare` put files in its directory (owned by the server's
    /// user afterwards), and starts it with `settings` (`("ssl", "on")`).
    pub fn start_with(
        settings: &[(&str, &str)],
        prepare: impl FnOnce(&std::path::Path),
    ) -> PrivateCluster {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .expect("PostgreSQL server binaries under /usr/lib/postgresql")
            .filter_map(|entry| entry.ok().map(|e| e.path().join("bin")))
            .filter(|bin| bin.join("initdb").exists())
            .max()
            .expect("an initdb");
        let dir = std::env::temp_dir().join(format!("sy-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("a data dir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        prepare(&dir);
        let settings = settings
            .iter()
            .map(|(name, value)| format!(" -c {name}={value}"))
            .collect();
        let cluster = PrivateCluster {
            port,
            dir,
            bin,
            settings,
        };
        cluster.shell("chown -R postgres: {dir}", true);
        cluster.shell(
            "{bin}/initdb -D {dir}/data -A trust -U postgres -E UTF8 --no-locale >/dev/null",
            false,
        );
        cluster.resume();
        cluster
    }

    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Stops the server (fast shutdown: connections are cut).
    pub fn pause(&self) {
        self.shell(
            "{bin}/pg_ctl -D {dir}/data -m fast -w stop >/dev/null",
            false,
        );
    }

    /// Starts it (again).
    pub fn resume(&self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {}{}",
            self.port,
            self.dir.display(),
            self.settings
        );
        self.shell(
            &format!(
                "{{bin}}/pg_ctl -D {{dir}}/data -l {{dir}}/log -w -o '{options}' start >/dev/null"
            ),
            false,
        );
    }

    fn shell(&self, template: &str, as_root: bool) {
        let command = template
            .replace("{bin}", &self.bin.display().to_string())
            .replace("{dir}", &self.dir.display().to_string());
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout.starts_with(b"0"))
            .unwrap_or(false);
        let status = if root && !as_root {
            std::process::Command::new("su")
                .args(["postgres", "-s", "/bin/sh", "-c", &command])
                .status()
        } else if root || !as_root {
            std::process::Command::new("sh")
                .args(["-c", &command])
                .status()
        } else {
            return;
        };
        assert!(status.is_ok_and(|s| s.success()), "`{command}` failed");
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        self.shell(
            "{bin}/pg_ctl -D {dir}/data -m immediate -w stop >/dev/null 2>&1 || true",
            false,
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Short client timeouts, so tests of slow clients finish quickly.
fn test_timeouts() -> crate::http::server::HttpTimeouts {
    crate::http::server::HttpTimeouts {
        headers: Duration::from_secs(2),
        body: Duration::from_secs(2),
    }
}
