//! Processes and their leases: each process registers with a heartbeat and a session advisory
//! lock; a dead one's claims and rate-limit key leases are released by the living.

use std::time::Duration;

use sqlx::{Connection, PgConnection};

use super::{Result, Store};

/// Advisory lock namespace: instance liveness.
const INSTANCE_LOCKS: i32 = 0x5357_0001;

/// A process whose heartbeat is older than this, and whose lock is free, is dead.
pub const DEAD_AFTER: Duration = Duration::from_secs(5);

/// This process's registration. Liveness has two signs: a session advisory lock held by a
/// connection of its own (gone the moment the process dies) and a heartbeat row; a process is
/// dead only when both are gone, so a dropped lock connection alone never makes a live
/// process's claims look abandoned.
pub struct Instance {
    pub id: i32,
    url: String,
    connection: Option<PgConnection>,
}

impl Instance {
    /// Beats the heartbeat and makes sure the lock is held, reconnecting for it if its
    /// connection dropped. Call every second or so.
    pub async fn keep_alive(&mut self, store: &Store) -> Result<()> {
        let beat = sqlx::query("UPDATE instances SET alive_at = now() WHERE id = $1")
            .bind(self.id)
            .execute(&store.pool)
            .await?;
        if beat.rows_affected() == 0 {
            // Declared dead while cut off (its claims were released): register again.
            sqlx::query(
                "INSERT INTO instances (id, delivers) VALUES ($1, true) ON CONFLICT DO NOTHING",
            )
            .bind(self.id)
            .execute(&store.pool)
            .await?;
        }
        let healthy = match self.connection.as_mut() {
            Some(connection) => connection.ping().await.is_ok(),
            None => false,
        };
        if !healthy {
            self.connection = None;
            let mut connection = PgConnection::connect(&self.url).await?;
            sqlx::query("SELECT pg_advisory_lock($1, $2)")
                .bind(INSTANCE_LOCKS)
                .bind(self.id)
                .execute(&mut connection)
                .await?;
            self.connection = Some(connection);
            tracing::info!(instance = self.id, "liveness lock taken again");
        }
        Ok(())
    }

    /// Deregisters this process (its jobs must have been released already).
    pub async fn close(mut self, store: &Store) -> Result<()> {
        sqlx::query("DELETE FROM instances WHERE id = $1")
            .bind(self.id)
            .execute(&store.pool)
            .await?;
        if let Some(connection) = self.connection.take() {
            connection.close().await?;
        }
        Ok(())
    }
}

const RELEASE_OWNED: &str = r#"
UPDATE jobs SET run_at = now(), owner = NULL
WHERE owner = $1 AND run_at > now()
"#;

const LEASE_KEYS: &str = r#"
INSERT INTO key_leases (key, owner, expires_at)
SELECT k, $2, now() + make_interval(secs => $3) FROM unnest($1::text[]) AS k
ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
WHERE key_leases.owner = EXCLUDED.owner OR key_leases.expires_at < now()
RETURNING key
"#;

impl Store {
    /// Registers this process: an id, a heartbeat row, and a session advisory lock on the id
    /// held by a connection of its own, so that when the process dies the lock goes with it.
    pub async fn register_instance(&self, url: &str, delivers: bool) -> Result<Instance> {
        let mut connection = PgConnection::connect(url).await?;
        let id: i64 = sqlx::query_scalar("SELECT nextval('instances_id_seq')")
            .fetch_one(&mut connection)
            .await?;
        let id = id as i32;
        sqlx::query("SELECT pg_advisory_lock($1, $2)")
            .bind(INSTANCE_LOCKS)
            .bind(id)
            .execute(&mut connection)
            .await?;
        sqlx::query("INSERT INTO instances (id, delivers) VALUES ($1, $2)")
            .bind(id)
            .bind(delivers)
            .execute(&mut connection)
            .await?;
        Ok(Instance {
            id,
            url: url.to_owned(),
            connection: Some(connection),
        })
    }

    /// Makes the jobs claimed by `owner` due again now (shutdown, or a dead process).
    pub async fn release_owned(&self, owner: i32) -> Result<u64> {
        let done = sqlx::query(RELEASE_OWNED)
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Finds processes that died (heartbeat stale and advisory lock free) and releases their
    /// claims at once rather than when their leases run out. Returns how many runs were
    /// released.
    pub async fn release_dead_instances(&self, me: i32) -> Result<u64> {
        let mut conn = self.pool.acquire().await?;
        let silent: Vec<i32> = sqlx::query_scalar(
            "SELECT id FROM instances WHERE id <> $1 AND alive_at < now() - make_interval(secs => $2)",
        )
        .bind(me)
        .bind(DEAD_AFTER.as_secs_f64())
        .fetch_all(&mut *conn)
        .await?;
        let mut released = 0;
        for id in silent {
            let dead: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1, $2)")
                .bind(INSTANCE_LOCKS)
                .bind(id)
                .fetch_one(&mut *conn)
                .await?;
            if !dead {
                continue;
            }
            released += sqlx::query(RELEASE_OWNED)
                .bind(id)
                .execute(&mut *conn)
                .await?
                .rows_affected();
            sqlx::query("DELETE FROM key_leases WHERE owner = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            sqlx::query("DELETE FROM instances WHERE id = $1")
                .bind(id)
                .execute(&mut *conn)
                .await?;
            sqlx::query("SELECT pg_advisory_unlock($1, $2)")
                .bind(INSTANCE_LOCKS)
                .bind(id)
                .execute(&mut *conn)
                .await?;
        }
        Ok(released)
    }

    /// Takes or renews leases on rate-limit keys (by digest) for `ttl`; returns the keys this
    /// process holds afterwards. A key held by another live process is left alone.
    pub async fn lease_keys(
        &self,
        keys: &[String],
        owner: i32,
        ttl: Duration,
    ) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(LEASE_KEYS)
            .bind(keys)
            .bind(owner)
            .bind(ttl.as_secs_f64())
            .fetch_all(&self.pool)
            .await?)
    }

    /// The rate-limit keys (digests) another live process holds.
    pub async fn keys_held_elsewhere(&self, owner: i32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT key FROM key_leases WHERE owner <> $1 AND expires_at > now()",
        )
        .bind(owner)
        .fetch_all(&self.pool)
        .await?)
    }

    /// How many live processes deliver (ingest-only processes take no rate-limit keys).
    pub async fn delivering_instances(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT count(*) FROM instances \
             WHERE delivers AND alive_at > now() - make_interval(secs => $1)",
        )
        .bind(DEAD_AFTER.as_secs_f64())
        .fetch_one(&self.pool)
        .await?)
    }

    /// Gives up some key leases of `owner`, for another process to take.
    pub async fn release_key_leases(&self, keys: &[String], owner: i32) -> Result<()> {
        sqlx::query("DELETE FROM key_leases WHERE owner = $1 AND key = ANY($2)")
            .bind(owner)
            .bind(keys)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Gives up every key lease of `owner` (at shutdown).
    pub async fn release_keys(&self, owner: i32) -> Result<()> {
        sqlx::query("DELETE FROM key_leases WHERE owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
