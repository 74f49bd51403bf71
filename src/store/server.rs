//! The Postgres server before there is a database to open: whether it answers, and creating or
//! dropping a database through the server's `postgres` maintenance database. `serve`,
//! `migrate` and `demo` use it to find their database (`crate::cli::bootstrap`); it lives here
//! so that every SQL statement does.

use std::time::Duration;

use sqlx::{Connection, Executor, PgConnection};

use super::{Result, StoreError};

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// 3D000: the database does not exist.
const INVALID_CATALOG_NAME: &str = "3D000";

/// What one connection attempt says about the server.
pub enum Probe {
    Reachable,
    /// Not (yet) reachable: refused, timed out, starting up, or out of connections.
    Retry(String),
    /// It answered, and retrying will not change its answer (bad password, bad URL...).
    Fatal(StoreError),
}

/// Tries `url` once. A missing database counts as reachable: it is created later.
pub async fn probe(url: &str) -> Probe {
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
            Some(_) => Probe::Fatal(e.into()),
            None if matches!(e, sqlx::Error::Configuration(_) | sqlx::Error::Tls(_)) => {
                Probe::Fatal(e.into())
            }
            // A certificate that does not verify will not verify on the next try either.
            None if is_certificate_error(&e) => Probe::Fatal(e.into()),
            None => Probe::Retry(e.to_string()),
        },
    }
}

/// The server's certificate was refused (unknown issuer, wrong name, expired): sqlx reports it
/// as an I/O error wrapping rustls's.
pub fn refused_certificate(error: &StoreError) -> bool {
    matches!(error, StoreError::Database(error) if is_certificate_error(error))
}

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

/// Whether the database `url` names exists (its server must answer).
pub async fn database_exists(url: &str) -> Result<bool> {
    match connect(url).await {
        Ok(conn) => {
            let _ = conn.close().await;
            Ok(true)
        }
        Err(e) if db_code(&e).as_deref() == Some(INVALID_CATALOG_NAME) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// Where a maintenance connection could not be had: the URL tried, and why.
pub struct MaintenanceError {
    pub url: String,
    pub error: StoreError,
    /// None of the maintenance databases exists (`error` is the last one's).
    pub missing: bool,
}

/// Connects to the first of `urls` (the server's `postgres`, then `template1` where `postgres`
/// was dropped) that exists.
async fn connect_maintenance(
    urls: &[String],
) -> std::result::Result<PgConnection, MaintenanceError> {
    let mut last = None;
    for url in urls {
        match connect(url).await {
            Ok(conn) => return Ok(conn),
            Err(e) if db_code(&e).as_deref() == Some(INVALID_CATALOG_NAME) => {
                last = Some(MaintenanceError {
                    url: url.clone(),
                    error: e.into(),
                    missing: true,
                })
            }
            Err(e) => {
                return Err(MaintenanceError {
                    url: url.clone(),
                    error: e.into(),
                    missing: false,
                })
            }
        }
    }
    Err(last.unwrap_or_else(|| MaintenanceError {
        url: String::new(),
        error: StoreError::Database(sqlx::Error::RowNotFound),
        missing: true,
    }))
}

/// Why a database could not be created.
pub enum CreateError {
    /// No maintenance database to connect to.
    Maintenance(MaintenanceError),
    /// `CREATE DATABASE` failed.
    Create(StoreError),
}

/// Creates database `name` through the first maintenance database of `urls` that exists.
/// Another process creating it at the same moment is fine.
pub async fn create_database(urls: &[String], name: &str) -> std::result::Result<(), CreateError> {
    let mut conn = connect_maintenance(urls)
        .await
        .map_err(CreateError::Maintenance)?;
    let sql = format!("CREATE DATABASE {}", quote_identifier(name));
    let created = conn.execute(sql.as_str()).await;
    let _ = conn.close().await;
    match created {
        Ok(_) => Ok(()),
        // 42P04: it exists by now; 23505: a concurrent CREATE DATABASE won the catalog insert.
        Err(e) if matches!(db_code(&e).as_deref(), Some("42P04") | Some("23505")) => Ok(()),
        Err(e) => Err(CreateError::Create(e.into())),
    }
}

/// Drops database `name`, connected to the maintenance database `maintenance_url`, ending
/// its sessions.
pub async fn drop_database(maintenance_url: &str, name: &str) -> Result<()> {
    let mut connection = PgConnection::connect(maintenance_url).await?;
    sqlx::query(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_identifier(name)
    ))
    .execute(&mut connection)
    .await?;
    let _ = connection.close().await;
    Ok(())
}

/// Runs one statement on the database `url` names and returns the first column of its first
/// row as text (`None` when there is none or it is NULL): for tests and probes that look at
/// the database the way an operator would with `psql`.
pub async fn query_text(url: &str, sql: &str) -> Result<Option<String>> {
    let mut connection = PgConnection::connect(url).await?;
    let value = sqlx::query_scalar::<_, Option<String>>(sql)
        .fetch_optional(&mut connection)
        .await?;
    let _ = connection.close().await;
    Ok(value.flatten())
}

async fn connect(url: &str) -> std::result::Result<PgConnection, sqlx::Error> {
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

/// A PostgreSQL identifier that means exactly `name`, whatever characters it holds.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers() {
        assert_eq!(quote_identifier("switchyard"), "\"switchyard\"");
        assert_eq!(quote_identifier("we\"ird; drop"), "\"we\"\"ird; drop\"");
    }
}
