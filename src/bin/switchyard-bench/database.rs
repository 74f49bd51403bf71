//! The Postgres server the bench runs against: a database of its own per scenario, created
//! here and dropped at the end.

use std::sync::Mutex;

use anyhow::Context as _;
use sqlx::{Connection as _, PgConnection};
use url::Url;

/// The default server: the machine's own Postgres.
const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// A Postgres server and the bench databases made on it.
pub struct Server {
    base: Url,
    created: Mutex<Vec<String>>,
}

/// One bench database.
#[derive(Debug, Clone)]
pub struct Database {
    pub name: String,
    pub url: String,
}

impl Server {
    /// The server of `url` (its database part is ignored), or the default one.
    pub fn new(url: Option<&str>) -> anyhow::Result<Server> {
        let mut base = Url::parse(url.unwrap_or(DEFAULT_SERVER))
            .context("DATABASE_URL is not a URL (postgres://user@host:port/db)")?;
        base.set_path("");
        Ok(Server {
            base,
            created: Mutex::new(Vec::new()),
        })
    }

    fn url(&self, database: &str) -> String {
        let mut url = self.base.clone();
        url.set_path(&format!("/{database}"));
        url.to_string()
    }

    async fn admin(&self) -> anyhow::Result<PgConnection> {
        PgConnection::connect(&self.url("postgres"))
            .await
            .with_context(|| {
                format!(
                    "connecting to Postgres at {} (set DATABASE_URL to another server)",
                    self.url("postgres")
                )
            })
    }

    /// The settings that decide how a queue behaves on this server.
    pub async fn settings(&self) -> anyhow::Result<String> {
        let mut admin = self.admin().await?;
        let rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT name, setting FROM pg_settings WHERE name IN ('autovacuum', \
             'shared_buffers', 'synchronous_commit', 'fsync', 'max_wal_size', \
             'checkpoint_timeout', 'max_connections') ORDER BY name",
        )
        .fetch_all(&mut admin)
        .await?;
        Ok(rows
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join(" "))
    }

    /// `SHOW server_version`.
    pub async fn version(&self) -> anyhow::Result<String> {
        let mut admin = self.admin().await?;
        Ok(sqlx::query_scalar("SHOW server_version")
            .fetch_one(&mut admin)
            .await?)
    }

    /// The server's main process, when it runs on this machine (its backends' parent).
    pub async fn postmaster(&self) -> anyhow::Result<Option<u32>> {
        let mut admin = self.admin().await?;
        let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut admin)
            .await?;
        Ok(u32::try_from(backend).ok().and_then(crate::procfs::parent))
    }

    /// A fresh database `switchyard_bench_<pid>_<label>`.
    pub async fn create(&self, label: &str) -> anyhow::Result<Database> {
        let label: String = label
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .take(30)
            .collect();
        let name = format!("switchyard_bench_{}_{label}", std::process::id());
        let mut admin = self.admin().await?;
        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        if let Ok(mut created) = self.created.lock() {
            created.push(name.clone());
        }
        Ok(Database {
            url: self.url(&name),
            name,
        })
    }

    /// Drops every database [`Server::create`] made.
    pub async fn drop_all(&self) {
        let names = self
            .created
            .lock()
            .map(|mut created| std::mem::take(&mut *created))
            .unwrap_or_default();
        if names.is_empty() {
            return;
        }
        let Ok(mut admin) = self.admin().await else {
            eprintln!("could not drop the bench databases {names:?}");
            return;
        };
        for name in names {
            let drop = format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)");
            if let Err(error) = sqlx::query(&drop).execute(&mut admin).await {
                eprintln!("could not drop database {name}: {error}");
            }
        }
    }
}

impl Database {
    pub async fn connect(&self) -> anyhow::Result<PgConnection> {
        PgConnection::connect(&self.url)
            .await
            .with_context(|| format!("connecting to {}", self.name))
    }
}
