//! Finding a database: the given `DATABASE_URL`, the default one, or a private PostgreSQL.
//!
//! A URL the user gave is the only one ever used: when it does not answer it is retried for a
//! minute and then reported, never swapped for another server. Without one, Switchyard uses the
//! default local server, and when nothing answers there it starts a private PostgreSQL from the
//! installed server binaries, so that a fresh machine needs no database set-up at all.
//!
//! What it asks of the server itself (does it answer, create or drop a database) is in
//! [`crate::store::server`], with every other SQL statement.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tokio::net::TcpStream;
use tracing::{info, warn};

pub use crate::cli::private_postgres::{start_private_in, PrivatePostgres};
use crate::store::server::{self, CreateError, MaintenanceError, Probe};
use crate::store::StoreError;

/// Where Switchyard looks when no `DATABASE_URL` was given.
pub const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/switchyard";

pub(crate) const DEFAULT_ADDR: &str = "127.0.0.1:5432";
/// Off the standard port, so a private server never shadows (or is shadowed by) a real one.
const PRIVATE_PORT: u16 = 54329;
const PRIVATE_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:54329/switchyard";
/// How long a given server may stay unreachable before we give up on it.
const REACH_DEADLINE: Duration = Duration::from_secs(60);

/// The database to use and, when Switchyard started one, the private server to stop at exit.
pub struct Database {
    pub url: String,
    pub private: Option<PrivatePostgres>,
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
    let exists = server::database_exists(url)
        .await
        .map_err(cause)
        .with_context(|| format!("connecting to {}", mask_password(url)))?;
    if exists {
        return Ok(());
    }
    let maintenance = ["postgres", "template1"]
        .iter()
        .map(|db| maintenance_url(url, db))
        .collect::<anyhow::Result<Vec<_>>>()?;
    match server::create_database(&maintenance, &name).await {
        Ok(()) => {
            info!(database = %name, url = %mask_password(url), "created the database");
            Ok(())
        }
        Err(CreateError::Maintenance(MaintenanceError {
            url: target,
            error,
            missing,
        })) => {
            let failed = Err(cause(error));
            if missing {
                failed.with_context(|| format!("no maintenance database on {}", mask_password(url)))
            } else {
                failed.with_context(|| format!("connecting to {}", mask_password(&target)))
            }
        }
        Err(CreateError::Create(error)) => Err(cause(error)).with_context(|| {
            format!(
                "creating database {name} on {}",
                mask_password(&maintenance_url(url, "postgres").unwrap_or_default())
            )
        }),
    }
}

/// The database error itself, so that messages read as the server's own.
fn cause(error: StoreError) -> anyhow::Error {
    match error {
        StoreError::Database(error) => error.into(),
        other => other.into(),
    }
}

/// Retries `url` with backoff until it answers or `deadline` has passed, warning at each miss.
async fn wait_until_reachable(url: &str, deadline: Duration) -> anyhow::Result<()> {
    let masked = mask_password(url);
    let started = Instant::now();
    let mut delay = Duration::from_millis(250);
    let mut attempt = 1u32;
    loop {
        match server::probe(url).await {
            Probe::Reachable => return Ok(()),
            Probe::Fatal(e) if server::refused_certificate(&e) => {
                return Err(cause(e)).with_context(|| {
                    format!(
                        "the certificate of the database at {masked} does not verify (give its \
                         CA as sslrootcert=/path/ca.pem, or use sslmode=require to encrypt \
                         without verifying)"
                    )
                })
            }
            Probe::Fatal(e) => {
                return Err(cause(e))
                    .with_context(|| format!("the database at {masked} refused us"))
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

/// Drops the database `url` names (the demo's throwaway one), connecting to `postgres` on
/// the same server.
pub async fn drop_database(url: &str) -> anyhow::Result<()> {
    let mut maintenance = url::Url::parse(url)?;
    let name = maintenance.path().trim_start_matches('/').to_owned();
    maintenance.set_path("/postgres");
    server::drop_database(maintenance.as_str(), &name)
        .await
        .map_err(cause)
        .with_context(|| format!("dropping the database {name}"))
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
