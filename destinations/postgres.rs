//! `postgres`: a small warehouse. Delivered events become rows of a table in another Postgres
//! database, created if missing:
//!
//! ```sql
//! message_id text PRIMARY KEY, type text, event text, user_id text, anonymous_id text,
//! "timestamp" timestamptz, received_at timestamptz, properties jsonb, traits jsonb,
//! context jsonb, raw jsonb NOT NULL
//! ```
//!
//! A batch is one `INSERT ... ON CONFLICT (message_id) DO NOTHING`, so a retried event is
//! stored once. Errors are classified by SQLSTATE class: connection (08), resources (53),
//! operator intervention (57) and transaction rollback (40, serialization and deadlocks) are
//! retried, as are I/O errors and pool timeouts; everything else (permission denied, a table
//! of another shape, ...) is permanent. When a batch fails on data (class 22 or 23), its events
//! are inserted one by one so only the bad ones are dead-lettered.
//!
//! The one kind that imports `sqlx` outside the store: its vendor *is* a Postgres database
//! (another one, the user's), reached with a pool of its own.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::Deserialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use tokio::sync::OnceCell;

use super::mapping;
use crate::destination::{
    Built, DeliveryContext, Destination, Event, HttpSender, Kind, KindDefaults, Outcome,
    SettingError, Settings, Verdict,
};

pub static KIND: Kind = Kind {
    name: "postgres",
    catalog_name: "Postgres",
    defaults: KindDefaults {
        batch_size: 100,
        max_batch_size: 1000,
        rate_limit: None,
    },
    build,
};

/// Connections to the warehouse per destination.
const MAX_CONNECTIONS: u32 = 4;

/// The keys a `postgres` destination takes besides the common ones.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PostgresConfig {
    /// The warehouse database: `postgres://user:password@host:5432/database`. The user needs
    /// to create the table (once) and insert into it.
    url: String,
    /// The table (optionally `schema.table`): letters, digits and `_`, not starting with a
    /// digit. Default `events`.
    #[serde(default = "default_table")]
    table: String,
}

fn default_table() -> String {
    "events".into()
}

/// A configured warehouse destination. The pool is made on the first delivery, so checking a
/// config never connects.
pub struct Warehouse {
    options: PgConnectOptions,
    create_sql: String,
    insert_sql: String,
    pool: OnceCell<PgPool>,
}

fn build(settings: &Settings) -> Result<Built, Vec<SettingError>> {
    let mut errors = Vec::new();
    let Some(config) = settings.parse::<PostgresConfig>(&mut errors) else {
        return Err(errors);
    };
    let options =
        if !config.url.starts_with("postgres://") && !config.url.starts_with("postgresql://") {
            errors.push(SettingError::new("url", "must be a postgres:// URL"));
            None
        } else {
            PgConnectOptions::from_str(&config.url)
                .map_err(|e| {
                    errors.push(SettingError::new(
                        "url",
                        format!("is not a valid Postgres URL: {e}"),
                    ))
                })
                .ok()
        };
    let table = quoted_table(&config.table)
        .map_err(|message| errors.push(SettingError::new("table", message)))
        .ok();
    let (Some(options), Some(table), true) = (options, table, errors.is_empty()) else {
        return Err(errors);
    };
    Ok(Built {
        credential: None,
        plugin: Arc::new(Warehouse {
            options,
            create_sql: CREATE.replace("{table}", &table),
            insert_sql: INSERT.replace("{table}", &table),
            pool: OnceCell::new(),
        }),
    })
}

/// `schema.table` or `table`, each part a plain identifier, quoted for SQL.
fn quoted_table(name: &str) -> Result<String, String> {
    let parts: Vec<&str> = name.split('.').collect();
    let valid = |part: &str| {
        !part.is_empty()
            && part.len() <= 63
            && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !part.starts_with(|c: char| c.is_ascii_digit())
    };
    if parts.len() > 2 || !parts.iter().all(|p| valid(p)) {
        return Err(format!(
            "`{name}` is not a table name: use letters, digits and `_` (not first), at most 63, \
             optionally as `schema.table`"
        ));
    }
    Ok(parts
        .iter()
        .map(|p| format!("\"{p}\""))
        .collect::<Vec<_>>()
        .join("."))
}

const CREATE: &str = r#"
CREATE TABLE IF NOT EXISTS {table} (
    message_id   text PRIMARY KEY,
    type         text,
    event        text,
    user_id      text,
    anonymous_id text,
    "timestamp"  timestamptz,
    received_at  timestamptz,
    properties   jsonb,
    traits       jsonb,
    context      jsonb,
    raw          jsonb NOT NULL
)"#;

/// `$1` is a JSON array of events.
const INSERT: &str = r#"
INSERT INTO {table}
    (message_id, type, event, user_id, anonymous_id, "timestamp", received_at,
     properties, traits, context, raw)
SELECT e->>'messageId', e->>'type', e->>'event', e->>'userId', e->>'anonymousId',
       (e->>'timestamp')::timestamptz, (e->>'receivedAt')::timestamptz,
       e->'properties', e->'traits', e->'context', e
FROM jsonb_array_elements($1::text::jsonb) AS e
ON CONFLICT (message_id) DO NOTHING"#;

impl Warehouse {
    /// The pool, made (and the table created) on first use; a failure is not kept, so the
    /// next delivery tries again.
    async fn pool(&self, http: &dyn HttpSender) -> Result<&PgPool, Outcome> {
        self.pool
            .get_or_try_init(|| async {
                let options = self.checked_options(http).await?;
                let pool = PgPoolOptions::new()
                    .max_connections(MAX_CONNECTIONS)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_lazy_with(options);
                match sqlx::query(&self.create_sql).execute(&pool).await {
                    Ok(_) => Ok(pool),
                    // Another process created it at the same moment.
                    Err(error)
                        if matches!(sqlstate(&error).as_deref(), Some("23505" | "42P07")) =>
                    {
                        Ok(pool)
                    }
                    Err(error) => Err(classify(&error)),
                }
            })
            .await
    }

    /// The connect options after the address policy (`[security]`) had its say: the host is
    /// resolved and checked as a webhook's would be, and the pool connects to the address that
    /// was checked. With `sslmode=verify-full` the host name is kept, since the certificate is
    /// checked against it; the name is then resolved again at connect time. A Unix socket is a
    /// local address (loopback).
    async fn checked_options(&self, http: &dyn HttpSender) -> Result<PgConnectOptions, Outcome> {
        let (host, port) = match self.options.get_socket() {
            Some(_) => ("127.0.0.1", self.options.get_port()),
            None => (self.options.get_host(), self.options.get_port()),
        };
        let allowed = http
            .allowed_addresses(host, port)
            .await
            .map_err(Outcome::failed)?;
        let pin = self.options.get_socket().is_none()
            && !matches!(self.options.get_ssl_mode(), PgSslMode::VerifyFull);
        match allowed.first() {
            Some(address) if pin => Ok(self.options.clone().host(&address.to_string())),
            _ => Ok(self.options.clone()),
        }
    }

    async fn insert(&self, pool: &PgPool, events: &[Event]) -> Result<(), sqlx::Error> {
        let rows = mapping::json_array(events.iter().map(|e| e.payload.get().as_bytes()));
        let rows = String::from_utf8_lossy(&rows);
        sqlx::query(&self.insert_sql)
            .bind(rows.as_ref())
            .execute(pool)
            .await
            .map(drop)
    }

    async fn store(&self, http: &dyn HttpSender, events: &[Event]) -> Verdict {
        let pool = match self.pool(http).await {
            Ok(pool) => pool,
            Err(outcome) => return Verdict::All(outcome),
        };
        match self.insert(pool, events).await {
            Ok(()) => Verdict::All(Outcome::Delivered),
            Err(error) if events.len() > 1 && is_data_error(&error) => {
                let mut outcomes = Vec::with_capacity(events.len());
                for event in events {
                    outcomes.push(match self.insert(pool, std::slice::from_ref(event)).await {
                        Ok(()) => Outcome::Delivered,
                        Err(error) => classify(&error),
                    });
                }
                Verdict::PerEvent(outcomes)
            }
            Err(error) => Verdict::All(classify(&error)),
        }
    }
}

impl Destination for Warehouse {
    fn deliver<'a>(
        &'a self,
        ctx: &'a DeliveryContext<'a>,
        events: &'a [Event],
    ) -> BoxFuture<'a, Verdict> {
        Box::pin(self.store(ctx.http, events))
    }
}

fn sqlstate(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => db.code().map(|code| code.into_owned()),
        _ => None,
    }
}

fn is_data_error(error: &sqlx::Error) -> bool {
    sqlstate(error).is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
}

/// Retry what may pass by itself (connections, resources, conflicts); the rest is permanent.
pub fn classify(error: &sqlx::Error) -> Outcome {
    match error {
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            let message = format!("Postgres error {code}: {}", db.message());
            if ["08", "53", "57", "40"]
                .iter()
                .any(|class| code.starts_with(class))
            {
                Outcome::retry(message)
            } else {
                Outcome::failed(message)
            }
        }
        sqlx::Error::Configuration(_) => Outcome::failed(format!("Postgres: {error}")),
        _ => Outcome::retry(format!("Postgres: {error}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_checked_and_quoted() {
        assert_eq!(quoted_table("events").unwrap(), "\"events\"");
        assert_eq!(
            quoted_table("analytics.events_2").unwrap(),
            "\"analytics\".\"events_2\""
        );
        for bad in ["", "1events", "ev-ents", "a.b.c", "drop table x;", "a."] {
            assert!(quoted_table(bad).is_err(), "{bad}");
        }
    }
}
