//! Finding a database: the given `DATABASE_URL`, the default one, or a private PostgreSQL.
//!
//! A URL the user gave is the only one ever used: when it does not answer it is retried for a
//! minute and then reported, never swapped for another server. Without one, Switchyard uses the
//! default local server, and when nothing answers there it starts a private PostgreSQL from the
//! installed server binaries, so that a fresh machine needs no database set-up at all.
//!
//! It talks to Postgres itself (`sqlx`), outside the store: it runs before there is a database
//! for the store to open (to create it, or to drop the demo's), on the server's `postgres`
//! maintenance database.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use sqlx::{Connection, Executor, PgConnection};
use tokio::net::TcpStream;
use tokio::process::Command;
use tracing::{info, warn};

/// Where Switchyard looks when no `DATABASE_URL` was given.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/switchyard";

const DEFAULT_ADDR: &str = "127.0.0.1:5432";
/// Off the standard port, so a private server never shadows (or is shadowed by) a real one.
const PRIVATE_PORT: u16 = 54329;
const PRIVATE_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:54329/switchyard";
/// How long a given server may stay unreachable before we give up on it.
const REACH_DEADLINE: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Unix socket paths longer than this are refused by the kernel (108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 100;

/// The database to use and, when Switchyard started one, the private server to stop at exit.
pub struct Database {
    pub url: String,
    pub private: Option<PrivatePostgres>,
}

/// A PostgreSQL server this process started in its own data directory.
pub struct PrivatePostgres {
    data_dir: PathBuf,
    pg_ctl: PathBuf,
    /// PostgreSQL refuses to run as root, so as root every server command runs as this user.
    run_as: Option<String>,
}

impl PrivatePostgres {
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    async fn is_running(&self) -> bool {
        let args = [
            "-D".to_string(),
            path_arg(&self.data_dir),
            "status".to_string(),
        ];
        run_program(self.run_as.as_deref(), &self.pg_ctl, &args)
            .await
            .is_ok_and(|out| out.status.success())
    }

    /// Stops the server (fast shutdown: open sessions are ended, nothing committed is lost).
    pub async fn stop(&self) {
        let args = vec![
            "-D".to_string(),
            path_arg(&self.data_dir),
            "-m".to_string(),
            "fast".to_string(),
            "-w".to_string(),
            "stop".to_string(),
        ];
        match run_program(self.run_as.as_deref(), &self.pg_ctl, &args).await {
            Ok(out) if out.status.success() => {
                info!(data_dir = %self.data_dir.display(), "stopped the private PostgreSQL")
            }
            Ok(out) => warn!(
                data_dir = %self.data_dir.display(),
                output = %output_tail(&out),
                "could not stop the private PostgreSQL"
            ),
            Err(e) => warn!(
                data_dir = %self.data_dir.display(),
                error = %e,
                "could not stop the private PostgreSQL"
            ),
        }
    }
}

/// Decides which database to use. `explicit` is DATABASE_URL/--database-url when the user gave
/// one. The database itself may not exist yet: call [`create_database_if_missing`] next.
pub async fn resolve(explicit: Option<String>) -> anyhow::Result<Database> {
    if let Some(url) = explicit {
        wait_until_reachable(&url, REACH_DEADLINE).await?;
        return Ok(Database { url, private: None });
    }
    let answers = tokio::time::timeout(Duration::from_secs(1), TcpStream::connect(DEFAULT_ADDR))
        .await
        .is_ok_and(|r| r.is_ok());
    if answers {
        // Something listens; it may still be starting up, so give it the same patience.
        wait_until_reachable(DEFAULT_DATABASE_URL, REACH_DEADLINE).await?;
        return Ok(Database {
            url: DEFAULT_DATABASE_URL.to_string(),
            private: None,
        });
    }
    let cwd = std::env::current_dir().context("reading the current directory")?;
    let why = format!("nothing answered at {DEFAULT_ADDR} and DATABASE_URL was not set");
    let private =
        start_private_in(cwd.join(".switchyard").join("postgres"), PRIVATE_PORT, &why).await?;
    wait_until_reachable(PRIVATE_DATABASE_URL, REACH_DEADLINE).await?;
    Ok(Database {
        url: PRIVATE_DATABASE_URL.to_string(),
        private,
    })
}

/// Creates the database named in `url` if it does not exist, connecting to the `postgres`
/// maintenance database of the same server to do so. Another process creating it at the same
/// moment is fine.
pub async fn create_database_if_missing(url: &str) -> anyhow::Result<()> {
    let Some(name) = database_name(url)? else {
        return Ok(());
    };
    match connect(url).await {
        Ok(conn) => {
            let _ = conn.close().await;
            return Ok(());
        }
        Err(e) if db_code(&e).as_deref() == Some(INVALID_CATALOG_NAME) => {}
        Err(e) => {
            return Err(e).with_context(|| format!("connecting to {}", mask_password(url)));
        }
    }
    let mut conn = connect_maintenance(url).await?;
    let sql = format!("CREATE DATABASE {}", quote_identifier(&name));
    let created = conn.execute(sql.as_str()).await;
    let _ = conn.close().await;
    match created {
        Ok(_) => {
            info!(database = %name, url = %mask_password(url), "created the database");
            Ok(())
        }
        // 42P04: it exists by now; 23505: a concurrent CREATE DATABASE won the catalog insert.
        Err(e) if matches!(db_code(&e).as_deref(), Some("42P04") | Some("23505")) => Ok(()),
        Err(e) => Err(e).with_context(|| {
            format!(
                "creating database {name} on {}",
                mask_password(&maintenance_url(url, "postgres").unwrap_or_default())
            )
        }),
    }
}

const INVALID_CATALOG_NAME: &str = "3D000";

/// Connects to `postgres` on the server of `url`, or `template1` where `postgres` was dropped.
async fn connect_maintenance(url: &str) -> anyhow::Result<PgConnection> {
    let mut last = None;
    for db in ["postgres", "template1"] {
        let target = maintenance_url(url, db)?;
        match connect(&target).await {
            Ok(conn) => return Ok(conn),
            Err(e) if db_code(&e).as_deref() == Some(INVALID_CATALOG_NAME) => last = Some(e),
            Err(e) => {
                return Err(e).with_context(|| format!("connecting to {}", mask_password(&target)))
            }
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no maintenance database"), Into::into))
        .with_context(|| format!("no maintenance database on {}", mask_password(url)))
}

async fn connect(url: &str) -> Result<PgConnection, sqlx::Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect(url)).await {
        Ok(result) => result,
        Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {}s", CONNECT_TIMEOUT.as_secs()),
        ))),
    }
}

fn db_code(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// What one connection attempt says about the server.
enum Probe {
    Reachable,
    /// Not (yet) reachable: refused, timed out, starting up, or out of connections.
    Retry(String),
    /// It answered, and retrying will not change its answer (bad password, bad URL...).
    Fatal(sqlx::Error),
}

async fn probe(url: &str) -> Probe {
    match connect(url).await {
        Ok(conn) => {
            let _ = conn.close().await;
            Probe::Reachable
        }
        Err(e) => match db_code(&e).as_deref() {
            // The server is up; the database is created later.
            Some(INVALID_CATALOG_NAME) => Probe::Reachable,
            // cannot_connect_now (starting up or shutting down), too_many_connections.
            Some("57P03") | Some("53300") => Probe::Retry(e.to_string()),
            Some(_) => Probe::Fatal(e),
            None if matches!(e, sqlx::Error::Configuration(_) | sqlx::Error::Tls(_)) => {
                Probe::Fatal(e)
            }
            // A certificate that does not verify will not verify on the next try either.
            None if is_certificate_error(&e) => Probe::Fatal(e),
            None => Probe::Retry(e.to_string()),
        },
    }
}

/// The server's certificate was refused (unknown issuer, wrong name, expired): sqlx reports it
/// as an I/O error wrapping rustls's.
fn is_certificate_error(error: &sqlx::Error) -> bool {
    let sqlx::Error::Io(io) = error else {
        return false;
    };
    io.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some_and(|tls| {
            matches!(
                tls,
                rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
            )
        })
}

/// Retries `url` with backoff until it answers or `deadline` has passed, warning at each miss.
async fn wait_until_reachable(url: &str, deadline: Duration) -> anyhow::Result<()> {
    let masked = mask_password(url);
    let started = Instant::now();
    let mut delay = Duration::from_millis(250);
    let mut attempt = 1u32;
    loop {
        match probe(url).await {
            Probe::Reachable => return Ok(()),
            Probe::Fatal(e) if is_certificate_error(&e) => {
                return Err(e).with_context(|| {
                    format!(
                        "the certificate of the database at {masked} does not verify (give its \
                         CA as sslrootcert=/path/ca.pem, or use sslmode=require to encrypt \
                         without verifying)"
                    )
                })
            }
            Probe::Fatal(e) => {
                return Err(e).with_context(|| format!("the database at {masked} refused us"))
            }
            Probe::Retry(error) => {
                let elapsed = started.elapsed();
                if elapsed >= deadline {
                    bail!(
                        "the database at {masked} did not answer within {}s (last error: {error}); \
                         check that it is running and that DATABASE_URL/--database-url is right",
                        deadline.as_secs()
                    );
                }
                let wait = delay.min(deadline - elapsed);
                warn!(
                    url = %masked,
                    attempt,
                    error = %error,
                    "database not reachable, retrying in {:.1}s",
                    wait.as_secs_f64()
                );
                tokio::time::sleep(wait).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                attempt += 1;
            }
        }
    }
}

/// Starts (or finds running) the private server in `.switchyard/postgres`. Returns `None` when
/// it was already running: that one belongs to another Switchyard, which will stop it.
/// Starts (or reuses) a PostgreSQL server with default settings in `data_dir` on
/// 127.0.0.1:`port`, creating it with initdb first if needed. `None` when one was already
/// running there (it is not ours to stop). `why` is logged.
pub async fn start_private_in(
    mut data_dir: PathBuf,
    port: u16,
    why: &str,
) -> anyhow::Result<Option<PrivatePostgres>> {
    let (initdb, pg_ctl) = find_server_binaries().ok_or_else(|| {
        anyhow::anyhow!(
            "nothing answers at {DEFAULT_ADDR} and DATABASE_URL is not set, and no PostgreSQL \
             server binaries (initdb, pg_ctl) were found to start a private one: install \
             PostgreSQL (e.g. `apt-get install postgresql`) or set DATABASE_URL"
        )
    })?;
    let run_as = if is_root() {
        Some(postgres_user().await?)
    } else {
        None
    };
    let cwd = std::env::current_dir().context("reading the current directory")?;
    prepare_data_dir(&data_dir, run_as.as_deref()).await?;
    if let Some(user) = run_as.as_deref() {
        if !user_can_write(user, &data_dir).await {
            // e.g. a checkout under /root, which the postgres user cannot enter.
            let fallback = std::env::temp_dir().join(format!(
                "switchyard-postgres-{:016x}",
                fnv1a(cwd.as_os_str().as_encoded_bytes())
            ));
            warn!(
                wanted = %data_dir.display(),
                using = %fallback.display(),
                user,
                "the {user} user cannot write the private PostgreSQL's data directory here; using a temporary one"
            );
            data_dir = fallback;
            prepare_data_dir(&data_dir, run_as.as_deref()).await?;
        }
    }
    let server = PrivatePostgres {
        data_dir,
        pg_ctl,
        run_as,
    };
    // Two Switchyards starting together in one directory take turns; the second reuses.
    let _lock = lock_file(server.data_dir.with_extension("lock")).await?;
    let dir = path_arg(&server.data_dir);
    let user = server.run_as.as_deref();

    if !server.data_dir.join("PG_VERSION").exists() {
        let args: Vec<String> = [
            "-D",
            &dir,
            "-A",
            "trust",
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--no-locale",
        ]
        .map(String::from)
        .into();
        let out = run_program(user, &initdb, &args).await?;
        if !out.status.success() {
            bail!(
                "initdb {} failed: {}",
                server.data_dir.display(),
                output_tail(&out)
            );
        }
    }

    let reuse = |server: &PrivatePostgres| {
        info!(
            data_dir = %server.data_dir.display(),
            "using the private PostgreSQL already running on 127.0.0.1:{port}, because {why}"
        );
        Ok(None)
    };
    if server.is_running().await {
        return reuse(&server);
    }

    let socket_name = format!(".s.PGSQL.{port}");
    let socket_dir = if server.data_dir.as_os_str().len() + socket_name.len() < MAX_SOCKET_PATH {
        dir.clone()
    } else {
        path_arg(&std::env::temp_dir())
    };
    let log = path_arg(&server.data_dir.join("server.log"));
    // pg_ctl hands -o to a shell, hence the inner quoting.
    let options = format!(
        "-p {port} -c listen_addresses=127.0.0.1 -k {}",
        shell_quote(&socket_dir)
    );
    let args: Vec<String> = [
        "-D", &dir, "-l", &log, "-w", "-t", "60", "-o", &options, "start",
    ]
    .map(String::from)
    .into();
    let out = run_program(user, &server.pg_ctl, &args).await?;
    if !out.status.success() {
        // Another Switchyard in this directory may have started it a moment ago.
        if server.is_running().await {
            return reuse(&server);
        }
        let server_log = std::fs::read_to_string(server.data_dir.join("server.log"))
            .map(|s| tail(&s, 1500))
            .unwrap_or_default();
        bail!(
            "could not start a private PostgreSQL in {} (is port {port} taken?): {}\n{}",
            server.data_dir.display(),
            output_tail(&out),
            server_log
        );
    }
    info!(
        data_dir = %server.data_dir.display(),
        log = %log,
        "started a private PostgreSQL on 127.0.0.1:{port}, because {why}; it stops when its owner exits"
    );
    Ok(Some(server))
}

/// Holds an exclusive lock on `path` until the returned file is dropped.
async fn lock_file(path: PathBuf) -> anyhow::Result<std::fs::File> {
    tokio::task::spawn_blocking(move || {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.lock()
            .with_context(|| format!("locking {}", path.display()))?;
        Ok(file)
    })
    .await?
}

async fn prepare_data_dir(dir: &Path, run_as: Option<&str>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    if let Some(user) = run_as {
        let out = Command::new("chown")
            .arg("-R")
            .arg(user)
            .arg(dir)
            .output()
            .await
            .context("running chown")?;
        if !out.status.success() {
            bail!(
                "chown {user} {} failed: {}",
                dir.display(),
                output_tail(&out)
            );
        }
    }
    Ok(())
}

async fn user_can_write(user: &str, dir: &Path) -> bool {
    let test = PathBuf::from("test");
    let args = vec!["-w".to_string(), path_arg(dir)];
    run_program(Some(user), &test, &args)
        .await
        .is_ok_and(|out| out.status.success())
}

/// The user a root process runs the server as: `postgres`, which the OS packages create.
async fn postgres_user() -> anyhow::Result<String> {
    let exists = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .await
        .is_ok_and(|out| out.status.success());
    if !exists {
        bail!(
            "running as root, PostgreSQL will not run as root, and there is no `postgres` user to \
             run a private one as: install PostgreSQL from the OS packages (which creates it) \
             or set DATABASE_URL"
        );
    }
    Ok("postgres".to_string())
}

/// Runs `program args` directly, or as `user` through `su` (present on every Linux).
async fn run_program(
    user: Option<&str>,
    program: &Path,
    args: &[String],
) -> anyhow::Result<std::process::Output> {
    let mut command = match user {
        Some(user) => {
            let mut c = Command::new("su");
            c.args([user, "-s", "/bin/sh", "-c", &shell_command(program, args)]);
            c
        }
        None => {
            let mut c = Command::new(program);
            c.args(args);
            c
        }
    };
    // The server user may not be allowed into our working directory.
    command.current_dir("/").stdin(std::process::Stdio::null());
    command
        .output()
        .await
        .with_context(|| format!("running {}", program.display()))
}

/// The newest `/usr/lib/postgresql/*/bin` (Debian, Ubuntu), else `initdb` and `pg_ctl` on PATH.
fn find_server_binaries() -> Option<(PathBuf, PathBuf)> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let bin = entry.path().join("bin");
            let version = parse_version(entry.file_name().to_str()?)?;
            (is_executable(&bin.join("initdb")) && is_executable(&bin.join("pg_ctl")))
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some((bin.join("initdb"), bin.join("pg_ctl")));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).find_map(|dir| {
        let (initdb, pg_ctl) = (dir.join("initdb"), dir.join("pg_ctl"));
        (is_executable(&initdb) && is_executable(&pg_ctl)).then_some((initdb, pg_ctl))
    })
}

fn parse_version(name: &str) -> Option<Vec<u32>> {
    name.split('.').map(|part| part.parse().ok()).collect()
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| effective_uid(&status))
        .or_else(|| {
            let out = std::process::Command::new("id").arg("-u").output().ok()?;
            String::from_utf8(out.stdout).ok()?.trim().parse().ok()
        })
        == Some(0)
}

/// The effective uid from `/proc/self/status` (`Uid: real effective saved fs`).
fn effective_uid(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// The database name in a `postgres://` URL, percent-decoded; `None` when the URL names none.
fn database_name(url: &str) -> anyhow::Result<Option<String>> {
    let parsed =
        url::Url::parse(url).with_context(|| format!("bad database URL {}", mask_password(url)))?;
    let path = parsed.path().trim_start_matches('/');
    if path.is_empty() {
        return Ok(None);
    }
    let name = percent_decode(path)
        .with_context(|| format!("bad database name in {}", mask_password(url)))?;
    if name.contains('\0') {
        bail!("bad database name in {}", mask_password(url));
    }
    Ok(Some(name))
}

/// The same server and credentials as `url`, but database `db`.
fn maintenance_url(url: &str, db: &str) -> anyhow::Result<String> {
    let mut parsed =
        url::Url::parse(url).with_context(|| format!("bad database URL {}", mask_password(url)))?;
    parsed.set_path(db);
    Ok(parsed.to_string())
}

fn percent_decode(s: &str) -> anyhow::Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s.get(i + 1..i + 3).context("truncated %-escape")?;
            out.push(u8::from_str_radix(hex, 16).context("bad %-escape")?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).context("not UTF-8")
}

/// A PostgreSQL identifier that means exactly `name`, whatever characters it holds.
fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `url` with its password (in the user info or a `password=` parameter) replaced by `***`.
/// Works on strings that are not valid URLs too, since those get logged as well.
pub fn mask_password(url: &str) -> String {
    let mut out = url.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo_end = rest_start + at;
            if let Some(colon) = out[rest_start..userinfo_end].find(':') {
                out.replace_range(rest_start + colon + 1..userinfo_end, "***");
            }
        }
    }
    if let Some(query_start) = out.find('?') {
        let (head, query) = out.split_at(query_start + 1);
        let masked: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                _ => pair.to_string(),
            })
            .collect();
        out = format!("{head}{}", masked.join("&"));
    }
    out
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn shell_command(program: &Path, args: &[String]) -> String {
    std::iter::once(path_arg(program))
        .chain(args.iter().cloned())
        .map(|a| shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}

fn path_arg(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

fn output_tail(out: &std::process::Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    tail(text.trim(), 1500)
}

fn tail(s: &str, max: usize) -> String {
    let start = s.len().saturating_sub(max);
    let start = (start..=s.len())
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

/// A stable hash, so the fallback data directory is the same on every run from one checkout.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Drops the database `url` names (the demo's throwaway one), connecting to `postgres` on
/// the same server.
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let mut maintenance = url::Url::parse(url)?;
    let name = maintenance.path().trim_start_matches('/').to_owned();
    maintenance.set_path("/postgres");
    let mut connection = PgConnection::connect(maintenance.as_str())
        .await
        .context("connecting to drop the database")?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
        name.replace('"', "\"\"")
    ))
    .execute(&mut connection)
    .await
    .with_context(|| format!("dropping the database {name}"))?;
    let _ = connection.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_password_in_user_info() {
        assert_eq!(
            mask_password("postgres://app:s3cr%40t@db:5432/switchyard"),
            "postgres://app:***@db:5432/switchyard"
        );
        assert_eq!(
            mask_password("postgres://app:p@ss@db/x?sslmode=require"),
            "postgres://app:***@db/x?sslmode=require"
        );
    }

    #[test]
    fn masks_password_parameter() {
        assert_eq!(
            mask_password("postgres://db/x?user=app&password=hunter2&sslmode=disable"),
            "postgres://db/x?user=app&password=***&sslmode=disable"
        );
    }

    #[test]
    fn leaves_urls_without_password_alone() {
        for url in [
            DEFAULT_DATABASE_URL,
            "postgres://127.0.0.1/x",
            "postgres://user@host/db?a=b",
            "not a url",
        ] {
            assert_eq!(mask_password(url), url);
        }
    }

    #[test]
    fn extracts_database_name() {
        assert_eq!(
            database_name(DEFAULT_DATABASE_URL).unwrap().as_deref(),
            Some("switchyard")
        );
        assert_eq!(
            database_name("postgres://u@h/my%20db?sslmode=disable")
                .unwrap()
                .as_deref(),
            Some("my db")
        );
        assert_eq!(database_name("postgres://u@h").unwrap(), None);
        assert_eq!(database_name("postgres://u@h/").unwrap(), None);
        assert!(database_name("postgres://u@h/a%00b").is_err());
        assert!(database_name("::").is_err());
    }

    #[test]
    fn maintenance_url_keeps_server_and_credentials() {
        assert_eq!(
            maintenance_url(
                "postgres://app:pw@db:6543/switchyard?sslmode=disable",
                "postgres"
            )
            .unwrap(),
            "postgres://app:pw@db:6543/postgres?sslmode=disable"
        );
    }

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_identifier("switchyard"), "\"switchyard\"");
        assert_eq!(quote_identifier("we\"ird; drop"), "\"we\"\"ird; drop\"");
    }

    #[test]
    fn quotes_shell_words() {
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(
            shell_command(
                Path::new("/bin/pg_ctl"),
                &["-o".into(), "-p 1 -k '/x'".into()]
            ),
            r"'/bin/pg_ctl' '-o' '-p 1 -k '\''/x'\'''"
        );
    }

    #[test]
    fn reads_effective_uid() {
        let status = "Name:\tx\nUid:\t1000\t0\t0\t0\nGid:\t0\t0\t0\t0\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Name:\tx\n"), None);
    }

    #[test]
    fn orders_versions_numerically() {
        let mut v = [
            parse_version("9.6").unwrap(),
            parse_version("16").unwrap(),
            parse_version("15").unwrap(),
        ];
        v.sort();
        assert_eq!(v.last(), Some(&vec![16]));
        assert_eq!(parse_version("main"), None);
    }

    #[test]
    fn tails_on_char_boundaries() {
        assert_eq!(tail("héllo", 4), "llo");
        assert_eq!(tail("abc", 10), "abc");
    }

    #[tokio::test]
    async fn a_given_url_that_never_answers_is_reported_not_replaced() {
        let err = wait_until_reachable(
            "postgres://u:secret@127.0.0.1:1/x",
            Duration::from_millis(600),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(err.contains("did not answer"), "{err}");
        assert!(err.contains("u:***@127.0.0.1:1"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }
}
