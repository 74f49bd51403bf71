//! Switchyard and PostgreSQL as child processes, for tests that kill, signal or stop them.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::ADMIN_TOKEN;

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

/// Runs `command` with its stdout a pipe whose reader has already gone (`| head` done
/// reading: every write fails with EPIPE), and asserts that it stops quietly: exit 0, nothing
/// on stderr.
#[track_caller]
pub fn assert_quiet_when_its_reader_has_gone(command: &mut std::process::Command) {
    let output = command
        .stdout(closed_pipe())
        .output()
        .expect("the command runs");
    assert_eq!(
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr)
        ),
        (Some(0), "".into())
    );
}

/// The writing end of a pipe whose reader has already gone: every write fails with EPIPE.
pub fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    writer
}
