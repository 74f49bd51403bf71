//! What Postgres was busy with while a scenario ran: `pg_stat_activity` sampled four times a
//! second and counted by wait event, so that a soak minute whose p99 spikes says what stalled
//! (WAL flushes, a checkpoint's writes, a lock, autovacuum) instead of only that it did.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::database::Database;

/// Each sample: the scenario database's active backends, and the server's checkpointer, WAL
/// writer and autovacuum workers when they are doing something, by what they wait on
/// (`running` when on CPU); an autovacuum worker by what it does and to which table
/// (`autovacuum VACUUM events_d20422 IO:DataFileRead`).
const SAMPLE: &str = r#"
SELECT CASE WHEN backend_type = 'client backend' THEN ''
            WHEN backend_type = 'autovacuum worker'
                THEN replace(replace(query, 'autovacuum: ', 'autovacuum '), 'public.', '') || ' '
            ELSE backend_type || ' ' END
       || coalesce(wait_event_type || ':' || wait_event, 'running') AS what,
       count(*)::bigint
FROM pg_stat_activity
WHERE pid <> pg_backend_pid()
  AND ((datname = current_database() AND state = 'active')
       OR (backend_type IN ('checkpointer', 'walwriter', 'autovacuum worker')
           AND wait_event_type IS DISTINCT FROM 'Activity'))
GROUP BY 1
"#;

/// Checkpoints the server has started since it was started.
const CHECKPOINTS: &str =
    "SELECT (checkpoints_timed + checkpoints_req)::bigint FROM pg_stat_bgwriter";

const EVERY: Duration = Duration::from_millis(250);

/// The sampler; it stops when dropped.
pub struct Waits {
    counts: Arc<Mutex<BTreeMap<String, i64>>>,
    task: tokio::task::JoinHandle<()>,
    checkpoints: i64,
    database: Database,
}

impl Waits {
    pub async fn start(database: &Database) -> anyhow::Result<Waits> {
        let counts = Arc::new(Mutex::new(BTreeMap::new()));
        let mut connection = database.connect().await?;
        let checkpoints = sqlx::query_scalar(CHECKPOINTS)
            .fetch_one(&mut connection)
            .await?;
        let shared = counts.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(EVERY).await;
                let Ok(rows) = sqlx::query_as::<_, (String, i64)>(SAMPLE)
                    .fetch_all(&mut connection)
                    .await
                else {
                    continue;
                };
                let mut counts = shared.lock().expect("waits lock");
                for (what, n) in rows {
                    *counts.entry(what).or_default() += n;
                }
            }
        });
        Ok(Waits {
            counts,
            task,
            checkpoints,
            database: database.clone(),
        })
    }

    /// The samples since the last call, the most frequent first (at most `top`), with the
    /// checkpoints started meanwhile: `{"checkpoints": n, "waits": {"IO:WALSync": 12, ...}}`
    /// (a count is backends × samples, four samples a second).
    pub async fn minute(&mut self, top: usize) -> Value {
        let counts = std::mem::take(&mut *self.counts.lock().expect("waits lock"));
        let mut sorted: Vec<(String, i64)> = counts.into_iter().collect();
        sorted.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        sorted.truncate(top);
        let mut checkpoints = None;
        if let Ok(mut connection) = self.database.connect().await {
            if let Ok(now) = sqlx::query_scalar::<_, i64>(CHECKPOINTS)
                .fetch_one(&mut connection)
                .await
            {
                checkpoints = Some(now - self.checkpoints);
                self.checkpoints = now;
            }
        }
        let waits: serde_json::Map<String, Value> =
            sorted.into_iter().map(|(k, v)| (k, json!(v))).collect();
        json!({"checkpoints": checkpoints, "waits": waits})
    }
}

impl Drop for Waits {
    fn drop(&mut self) {
        self.task.abort();
    }
}
