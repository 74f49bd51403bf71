//! `switchyard serve`: wires the stages together and shuts them down in order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::bootstrap;
use crate::cli::shutdown::Shutdown;
use crate::config::Config;
use crate::delivery::lane::LaneSet;
use crate::delivery::scheduler::Pool;
use crate::http::server::{self, AppState, HttpTimeouts, Roles};
use crate::ingest::backpressure::QueueDepth;
use crate::pipeline::{Pipeline, Reloader};
use crate::store::commit::GroupCommit;
use crate::store::Store;

/// Which stages this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Ingest and delivery.
    All,
    /// `/v1/*` only; delivers nothing.
    Ingest,
    /// Delivery only; serves no `/v1/*`.
    Worker,
}

/// What `serve` needs to start.
pub struct Settings {
    pub listen: String,
    /// `DATABASE_URL` or `--database-url`, when given.
    pub database_url: Option<String>,
    pub config: Config,
    /// Where the config came from (for log lines).
    pub config_path: Option<PathBuf>,
    pub role: Role,
    pub admin_token: Option<String>,
    /// How long in-flight deliveries may take to finish at shutdown.
    pub grace: Duration,
    /// How long clients may take to send headers and bodies.
    pub timeouts: HttpTimeouts,
}

/// A started Switchyard.
pub struct Running {
    pub addr: SocketAddr,
    /// Reloads the config file (SIGHUP, `POST /admin/v1/reload`).
    pub reloader: Arc<Reloader>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops intake, lets deliveries finish, releases every claim, and waits for the end.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.done.await.context("the server task failed")?
    }

    /// Waits until the server stops on its own (after a signal).
    pub async fn wait(self) -> anyhow::Result<()> {
        self.done.await.context("the server task failed")?
    }

    /// The token that stops it (hand it to a signal handler).
    pub fn stopper(&self) -> CancellationToken {
        self.stop.clone()
    }
}

/// The process-wide metrics recorder (installed once; every server in the process shares it).
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
            ];
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("switchyard_delivery_latency_seconds".into()),
                    &latency,
                )
                .expect("buckets are not empty")
                .set_buckets_for_metric(
                    Matcher::Full("switchyard_http_request_duration_seconds".into()),
                    &latency,
                )
                .expect("buckets are not empty")
                .build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::debug!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}

/// Connects, migrates, and starts every stage; returns once the listener is bound.
pub async fn start(settings: Settings) -> anyhow::Result<Running> {
    let database = bootstrap::resolve(settings.database_url.clone()).await?;
    bootstrap::create_database_if_missing(&database.url).await?;
    let store = Store::connect(&database.url, 32)
        .await
        .context("connecting to the database")?;
    store.migrate().await.context("applying migrations")?;
    let config = &settings.config;
    let retention = config.archive.retention;
    store.upkeep(retention).await?;
    store.prepare_today().await?;

    let client = crate::delivery::sender::HttpClient::new(&config.security);
    let pipeline = Pipeline::build(&store, config, &client, None).await?;
    // Destinations removed from the config while no process ran: their queued work becomes
    // dead letters now instead of waiting forever and counting against `max_queued`.
    let known: Vec<i32> = pipeline.destination_ids.values().copied().collect();
    match store.retire_removed(&known).await {
        Ok(0) => {}
        Ok(moved) => {
            tracing::warn!(
                events = moved,
                "dead-lettered work of destinations no longer configured"
            )
        }
        Err(error) => tracing::warn!(%error, "retiring removed destinations failed"),
    }
    let lanes: LaneSet = Arc::new(ArcSwap::from_pointee(pipeline.lanes.clone()));
    let pipeline = Arc::new(ArcSwap::from_pointee(pipeline));
    let reloader = Arc::new(Reloader {
        path: settings.config_path.clone(),
        store: store.clone(),
        client: ArcSwap::from_pointee(client),
        pipeline: pipeline.clone(),
        lanes: lanes.clone(),
        lock: Default::default(),
    });
    let depth = Arc::new(QueueDepth::default());
    if let Err(error) = depth.sample(&store).await {
        tracing::warn!(%error, "counting the queue failed");
    }

    let (commit, writers) = GroupCommit::start(store.clone(), !retention.is_zero());
    let commit_times = commit.times();
    let state = Arc::new(AppState {
        store: store.clone(),
        pipeline,
        reloader: reloader.clone(),
        commit,
        admin_token: settings.admin_token.clone(),
        metrics: metrics_handle(),
        draining: Default::default(),
        commit_timeout: Duration::from_secs(5),
        depth: depth.clone(),
        timeouts: settings.timeouts,
        live: Default::default(),
        source_rates: Default::default(),
    });
    let roles = Roles {
        ingest: settings.role != Role::Worker,
    };
    let delivers = settings.role != Role::Ingest;

    let mut instance = store
        .register_instance(&database.url, delivers)
        .await
        .context("registering this process")?;
    let pool = delivers.then(|| {
        Pool::start(
            store.clone(),
            lanes.clone(),
            config.limits.max_concurrent_deliveries,
            instance.id,
            roles.ingest.then_some(commit_times),
        )
    });

    let listener = TcpListener::bind(&settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        role = ?settings.role,
        sources = config.sources.len(),
        destinations = lanes.load().len(),
        config = ?settings.config_path,
        "switchyard is serving"
    );

    let stop = CancellationToken::new();
    let maintenance = tokio::spawn(maintain(store.clone(), retention, stop.clone()));
    let instance_id = instance.id;
    let liveness = tokio::spawn({
        let store = store.clone();
        let stop = stop.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return instance,
                    _ = every.tick() => {}
                }
                if let Err(error) = instance.keep_alive(&store).await {
                    tracing::warn!(%error, "keeping this process's liveness failed; retrying");
                }
            }
        }
    });
    let counting = tokio::spawn(count_queue(
        store.clone(),
        depth,
        lanes.clone(),
        stop.clone(),
    ));
    // Processes that deliver also select replay work from the archive.
    let replays = delivers.then(|| {
        tokio::spawn(crate::delivery::replay::run(
            store.clone(),
            state.pipeline.clone(),
            stop.clone(),
        ))
    });
    let app = server::router(state.clone(), roles);
    let grace = settings.grace;
    let done = tokio::spawn({
        let stop = stop.clone();
        async move {
            let http_stop = CancellationToken::new();
            let server = tokio::spawn({
                let http_stop = http_stop.clone();
                let timeouts = settings.timeouts;
                async move { server::serve_http(listener, app, timeouts, http_stop).await }
            });
            stop.cancelled().await;
            Shutdown {
                state,
                server,
                http_stop,
                writers,
                pool,
                grace,
                maintenance,
                counting,
                replays,
                store,
                instance_id,
                liveness,
                private: database.private,
            }
            .run()
            .await;
            Ok(())
        }
    });
    Ok(Running {
        addr,
        reloader,
        stop,
        done,
    })
}

/// Periodic upkeep: day partitions made ahead, old ones dropped, and the histograms' samples
/// folded into their buckets. The recorder keeps every sample until a scrape or an upkeep
/// drains it, so a process nobody scrapes grew by about 3.5 MB a minute at 3,500 deliveries/s.
async fn maintain(store: Store, retention: Duration, stop: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_secs(10));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        metrics_handle().run_upkeep();
        match store.upkeep(retention).await {
            Ok(report) if report != Default::default() => {
                tracing::info!(?report, "partition upkeep")
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "partition maintenance failed"),
        }
    }
}

/// Counts the queue every second, or less often when counting is slow (a deep backlog), so
/// counting never takes more than a tenth of the database's time; feeds backpressure and the
/// `switchyard_queue_depth` gauges.
async fn count_queue(
    store: Store,
    depth: Arc<QueueDepth>,
    lanes: LaneSet,
    stop: CancellationToken,
) {
    let mut pause = Duration::from_secs(1);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        match depth.sample(&store).await {
            Ok(took) => pause = (took * 10).clamp(Duration::from_secs(1), Duration::from_secs(30)),
            Err(error) => {
                tracing::debug!(%error, "counting the queue failed");
                continue;
            }
        }
        let (idle, used) = store.connections();
        metrics::gauge!("switchyard_db_pool_connections", "state" => "idle").set(idle as f64);
        metrics::gauge!("switchyard_db_pool_connections", "state" => "used").set(used as f64);
        let lanes = lanes.load();
        for lane in lanes.iter() {
            let (queued, _) = depth.destination(lane.id);
            metrics::gauge!("switchyard_queue_depth", "destination" => lane.config.name.clone())
                .set(queued as f64);
            lane.stats
                .rates
                .sample_depth(u32::try_from(queued).unwrap_or(u32::MAX));
        }
    }
}
