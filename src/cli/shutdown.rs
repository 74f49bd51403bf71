//! The ordered shutdown of `serve`: what a stop signal sets off, step by step.
//!
//! The order is the point: intake stops before the last commits are awaited, deliveries finish
//! before claims are released, and the database goes last (with the private server, if one
//! was started), so nothing accepted is lost and nothing delivered is sent again.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use crate::cli::bootstrap::PrivatePostgres;
use crate::delivery::scheduler::Pool;
use crate::http::server::AppState;
use crate::store::{Instance, Store};

/// How long the HTTP server, then the group commit's writers, may take to finish.
const DRAIN: Duration = Duration::from_secs(15);

/// Everything a running `serve` must wind down, in the order it does.
pub struct Shutdown {
    pub state: Arc<AppState>,
    /// The HTTP server task, and the token that stops it accepting.
    pub server: JoinHandle<()>,
    pub http_stop: CancellationToken,
    /// The group commit's writer tasks.
    pub writers: JoinSet<()>,
    /// The worker pool (none with `--role ingest`) and how long its deliveries may take.
    pub pool: Option<Pool>,
    pub grace: Duration,
    /// Background upkeep that needs no goodbye.
    pub maintenance: JoinHandle<()>,
    pub counting: JoinHandle<()>,
    /// Selects replay work (processes that deliver).
    pub replays: Option<JoinHandle<()>>,
    pub store: Store,
    pub instance_id: i32,
    /// The liveness task; it hands back the instance to deregister.
    pub liveness: JoinHandle<Instance>,
    pub private: Option<PrivatePostgres>,
}

impl Shutdown {
    /// Stops intake, lets deliveries finish within the grace period, releases every claim,
    /// and closes the database.
    pub async fn run(self) {
        tracing::info!("shutting down: intake stopped, finishing deliveries");
        self.state.draining.store(true, Ordering::Release);
        self.state.live.close();
        // Requests already inside finish their commits; new ones get 503 meanwhile.
        self.http_stop.cancel();
        let _ = tokio::time::timeout(DRAIN, self.server).await;
        drop(self.state);
        let mut writers = self.writers;
        let drain = async { while writers.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(DRAIN, drain).await;
        if let Some(pool) = self.pool {
            pool.shutdown(self.grace).await;
        }
        self.maintenance.abort();
        self.counting.abort();
        if let Some(replays) = &self.replays {
            replays.abort();
        }
        let store = self.store;
        match store.release_owned(self.instance_id).await {
            Ok(0) => {}
            Ok(released) => tracing::info!(released, "released unfinished claims"),
            Err(error) => {
                tracing::warn!(%error, "releasing claims failed; their leases will expire")
            }
        }
        match self.liveness.await {
            Ok(instance) => {
                if let Err(error) = instance.close(&store).await {
                    tracing::debug!(%error, "deregistering failed");
                }
            }
            Err(error) => tracing::debug!(%error, "the liveness task failed"),
        }
        store.close().await;
        if let Some(private) = self.private {
            private.stop().await;
        }
        tracing::info!("stopped");
    }
}
