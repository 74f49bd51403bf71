//! The one shared worker pool: claims due deliveries fairly across destinations, runs the
//! plugins, and records every outcome.
//!
//! One scheduling loop visits destinations with due work in round robin. For each it claims
//! only as many jobs as it can start right away: the destination's free in-flight slots (its
//! adaptive limit, at most `max_in_flight`), bounded by the pool's free permits and by the
//! tokens its rate-limit key grants. So claimed work never waits in memory, and a slow or
//! rate-limited destination's backlog stays in Postgres where it delays no one: a key out of
//! tokens is set aside until the instant its bucket refills, holding no worker. Each request
//! runs in its own task under a timeout, with panics caught. Outcomes flow to a completer that
//! writes them in batches, and back to the key and the destination (Retry-After pauses, AIMD).
//! Idle, the loop sleeps until `NOTIFY` says work arrived, a slot frees up, a timer fires, or
//! the periodic check finds retries that came due.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{self};
use crate::delivery::background;
use crate::delivery::lane::{Lane, LaneSet};
use crate::delivery::pace::{self, ReplayPace};
use crate::delivery::runs::{complete, deliver, Claimed, OpenRuns, RunProgress, Settled};
use crate::delivery::traffic::Closed;
use crate::store::{self, CommitTimes, Fate, Store};

/// Events claimed for one destination at most.
const MAX_CLAIM: usize = 1000;
/// Replay claims out at once for one destination at most. One: with two, the next read
/// overlapping the last one's requests, a replay ran a fifth faster and took the machine from
/// live traffic. On two cores of the `replay` bench, live events arriving at 1,000/s then
/// waited up to a second for their commit (their clients fell behind), against 40 to 100 ms
/// with one; on a faster machine, live p99 26 ms with two and 18 with one.
const REPLAY_CLAIMS: usize = 1;
/// Destinations claimed for in one statement at most.
const CLAIM_GROUP: usize = 256;
/// How often due work is looked for without a notification (retries coming due).
const POLL_EVERY: Duration = Duration::from_secs(1);

/// What wakes the scheduling loop.
#[derive(Debug)]
pub enum Wake {
    /// Work arrived for these destinations.
    Destinations(Vec<i32>),
    /// Look at every destination.
    All,
    /// A replay claim made off the loop came back.
    Replayed(ReplayClaim),
}

/// A claim of replay runs, made off the scheduling loop so that live claims never wait behind
/// it, with the permits and in-flight slots set aside for the requests it may start.
pub struct ReplayClaim {
    asks: Vec<(Arc<Lane>, Demand)>,
    /// `None` when the claim failed.
    claimed: Option<HashMap<i32, Vec<store::ClaimedRun>>>,
    permits: Option<OwnedSemaphorePermit>,
}

impl std::fmt::Debug for ReplayClaim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayClaim")
            .field("destinations", &self.asks.len())
            .field("failed", &self.claimed.is_none())
            .finish()
    }
}

impl ReplayClaim {
    /// Gives back the slots set aside for it; returns the claimed runs.
    fn settle(&mut self) -> HashMap<i32, Vec<store::ClaimedRun>> {
        self.permits = None;
        for (lane, demand) in &self.asks {
            lane.reserved.fetch_sub(demand.requests, Ordering::AcqRel);
            lane.replay_claims.fetch_sub(1, Ordering::AcqRel);
        }
        self.claimed.take().unwrap_or_default()
    }

    /// Releases its runs unsent, to be claimed again (the loop has stopped).
    fn release(mut self, finished: &mpsc::UnboundedSender<Settled>) {
        let ordered: HashMap<i32, bool> = self
            .asks
            .iter()
            .map(|(lane, demand)| (lane.id, demand.ask.ordered))
            .collect();
        for (id, runs) in self.settle() {
            let ordered = ordered.get(&id).copied().unwrap_or(false);
            for run in runs {
                release_run(run, id, ordered, finished);
            }
        }
    }
}

/// Settles a claimed run that was never started: every event is released.
fn release_run(
    run: store::ClaimedRun,
    lane: i32,
    ordered: bool,
    finished: &mpsc::UnboundedSender<Settled>,
) {
    let (progress, _) = RunProgress::start(run, lane, ordered);
    if let Some(outcome) = progress.close() {
        let _ = finished.send(Settled::new(&progress, outcome));
    }
}

/// The running pool's handle.
pub struct Pool {
    pub wake: mpsc::UnboundedSender<Wake>,
    tasks: tokio::task::JoinSet<()>,
    deliveries: TaskTracker,
    stop: CancellationToken,
    /// Tells the completer that no more outcomes are coming.
    drained: CancellationToken,
    open: Arc<OpenRuns>,
    finished: mpsc::UnboundedSender<Settled>,
}

impl Pool {
    /// Starts the scheduling loop, the completer, the `LISTEN` task and the sweeper.
    /// With `live`, the commit waits of this process's ingest requests, replays make way for
    /// live traffic ([`pace`](crate::delivery::pace)).
    pub fn start(
        store: Store,
        lanes: LaneSet,
        max_concurrent: usize,
        instance: i32,
        live: Option<Arc<CommitTimes>>,
    ) -> Pool {
        let (wake, woken) = mpsc::unbounded_channel();
        let (finished, outcomes) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let deliveries = TaskTracker::new();
        let mut tasks = tokio::task::JoinSet::new();
        let open = Arc::new(OpenRuns::default());
        let pace = Arc::new(ReplayPace::default());
        if let Some(live) = live {
            tasks.spawn(pace::govern(pace.clone(), live, stop.clone()));
        }
        let scheduler = Scheduler {
            store: store.clone(),
            open: open.clone(),
            lane_set: lanes.clone(),
            seen: Arc::new(Vec::new()),
            lanes: HashMap::new(),
            order: Vec::new(),
            permits: Arc::new(Semaphore::new(max_concurrent)),
            pool_size: max_concurrent.max(1),
            instance,
            pace,
            woken,
            wake: wake.clone(),
            finished: finished.clone(),
            deliveries: deliveries.clone(),
            stop: stop.clone(),
        };
        // Tracked with the deliveries: shutdown waits for the loop to hand back what it
        // claimed and never started.
        tasks.spawn(deliveries.track_future(scheduler.run()));
        let drained = CancellationToken::new();
        tasks.spawn(complete(
            store.clone(),
            instance,
            outcomes,
            wake.clone(),
            drained.clone(),
        ));
        tasks.spawn(background::listen(
            store.clone(),
            wake.clone(),
            stop.clone(),
        ));
        tasks.spawn(background::lease_keys(
            store.clone(),
            lanes.clone(),
            instance,
            wake.clone(),
            stop.clone(),
        ));
        tasks.spawn(background::sweep(
            store,
            instance,
            wake.clone(),
            stop.clone(),
        ));
        Pool {
            wake,
            tasks,
            deliveries,
            stop,
            drained,
            open,
            finished,
        }
    }

    /// Stops claiming, lets in-flight deliveries finish within `grace`, and writes every
    /// outcome. Claimed runs are settled: what was delivered or failed is written, and the
    /// events not sent yet (or still running after `grace`) are released to be claimed again,
    /// so nothing delivered before shutdown is delivered again after it.
    pub async fn shutdown(mut self, grace: Duration) {
        self.stop.cancel();
        self.deliveries.close();
        if tokio::time::timeout(grace, self.deliveries.wait())
            .await
            .is_err()
        {
            tracing::warn!("deliveries still running after the grace period; releasing them");
        }
        for run in self.open.take_all() {
            if let Some(outcome) = run.close() {
                let _ = self.finished.send(Settled::new(&run, outcome));
            }
        }
        self.drained.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

struct Scheduler {
    store: Store,
    open: Arc<OpenRuns>,
    lane_set: LaneSet,
    /// The lane set `lanes` and `order` were built from.
    seen: Arc<Vec<Arc<Lane>>>,
    lanes: HashMap<i32, Arc<Lane>>,
    /// Round-robin order of every destination.
    order: Vec<i32>,
    permits: Arc<Semaphore>,
    pool_size: usize,
    instance: i32,
    /// When replay claims may start.
    pace: Arc<ReplayPace>,
    woken: mpsc::UnboundedReceiver<Wake>,
    wake: mpsc::UnboundedSender<Wake>,
    finished: mpsc::UnboundedSender<Settled>,
    deliveries: TaskTracker,
    stop: CancellationToken,
}

impl Scheduler {
    async fn run(mut self) {
        let mut ready: VecDeque<i32> = VecDeque::new();
        let mut queued: HashSet<i32> = HashSet::new();
        let mut timers: BTreeMap<Instant, Vec<i32>> = BTreeMap::new();
        let mut poll = tokio::time::interval(POLL_EVERY);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.stop.is_cancelled() {
            self.follow_reloads(&mut ready, &mut queued);
            fire_timers(&mut timers, &mut ready, &mut queued);
            // Wake-ups are read on every pass, not only when idle: a destination that just got
            // work joins the round now, even while others keep the loop busy.
            let mut wakes = Vec::new();
            while let Ok(wake) = self.woken.try_recv() {
                wakes.push(wake);
            }
            let mut progressed = self
                .absorb_wakes(wakes, &mut ready, &mut queued, &mut timers)
                .await;
            // Permits not yet promised to a destination in this pass; only this loop takes
            // permits, so the semaphore never has fewer free than this.
            let mut free = self.permits.available_permits();
            let busy = self
                .lanes
                .values()
                .filter(|lane| lane.occupied() > 0)
                .count();
            let mut asks: Vec<(Arc<Lane>, Demand)> = Vec::new();
            for _ in 0..ready.len() {
                let Some(id) = ready.pop_front() else { break };
                let Some(lane) = self.lanes.get(&id).cloned() else {
                    queued.remove(&id);
                    continue;
                };
                // Others with work waiting, being claimed or in flight: each gets a fair share
                // of the pool.
                let others = (ready.len() + asks.len() + busy)
                    .saturating_sub(usize::from(lane.occupied() > 0));
                let visit = match self.plan(&lane, others, free) {
                    Plan::Now(visit) => visit,
                    Plan::Start(requests) => {
                        free -= requests;
                        self.start(&lane, requests, false)
                    }
                    Plan::Claim(demand) => {
                        free -= demand.requests;
                        asks.push((lane, demand));
                        if asks.len() == CLAIM_GROUP {
                            let asks = std::mem::take(&mut asks);
                            progressed |= self
                                .claim_and_settle(asks, &mut ready, &mut queued, &mut timers)
                                .await;
                        }
                        continue;
                    }
                };
                progressed |= settle(id, visit, &mut ready, &mut queued, &mut timers);
            }
            if !asks.is_empty() {
                progressed |= self
                    .claim_and_settle(asks, &mut ready, &mut queued, &mut timers)
                    .await;
            }
            if progressed {
                continue;
            }
            let next_timer = timers.keys().next().copied();
            let timer = async {
                match next_timer {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let wake = tokio::select! {
                _ = self.stop.cancelled() => break,
                wake = self.woken.recv() => wake,
                _ = poll.tick() => Some(Wake::All),
                _ = timer => continue,
            };
            let mut wakes: Vec<Wake> = wake.into_iter().collect();
            while let Ok(more) = self.woken.try_recv() {
                wakes.push(more);
            }
            self.absorb_wakes(wakes, &mut ready, &mut queued, &mut timers)
                .await;
        }
        // Replay claims that came back too late are released; those still out release
        // themselves when they find the loop gone.
        self.woken.close();
        while let Ok(wake) = self.woken.try_recv() {
            if let Wake::Replayed(claim) = wake {
                claim.release(&self.finished);
            }
        }
    }

    /// Adds woken destinations to the ready queue (all with due work, for `Wake::All`) and
    /// starts what replay claims brought back; true if that started anything.
    async fn absorb_wakes(
        &self,
        wakes: Vec<Wake>,
        ready: &mut VecDeque<i32>,
        queued: &mut HashSet<i32>,
        timers: &mut BTreeMap<Instant, Vec<i32>>,
    ) -> bool {
        let mut everyone = false;
        let mut progressed = false;
        for wake in wakes {
            match wake {
                Wake::Destinations(ids) => {
                    for id in ids {
                        if self.lanes.contains_key(&id) && queued.insert(id) {
                            ready.push_back(id);
                        }
                    }
                }
                Wake::All => everyone = true,
                Wake::Replayed(claim) => {
                    for (id, visit) in self.replay_claimed(claim) {
                        progressed |= settle_replayed(id, visit, ready, queued, timers);
                    }
                }
            }
        }
        if everyone {
            let changes: Vec<u64> = self
                .lanes
                .values()
                .map(|lane| lane.stats.pause_changes.load(Ordering::Acquire))
                .collect();
            match self.store.paused().await {
                Ok(paused) => {
                    for (lane, before) in self.lanes.values().zip(changes) {
                        // A pause or resume answered here meanwhile is newer than this read.
                        if lane.stats.pause_changes.load(Ordering::Acquire) == before {
                            let flag = paused.contains(&lane.id);
                            lane.stats.paused.store(flag, Ordering::Release);
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "reading paused destinations failed"),
            }
            match self.store.due_destinations(&self.order).await {
                Ok(due) => {
                    for id in due {
                        if queued.insert(id) {
                            ready.push_back(id);
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "looking for due work failed"),
            }
            // Lanes holding claimed events need no query to be due.
            for (id, lane) in &self.lanes {
                if lane.startable() > 0 && queued.insert(*id) {
                    ready.push_back(*id);
                }
            }
        }
        progressed
    }

    /// Picks up a new lane set after a reload; new and changed destinations are looked at.
    fn follow_reloads(&mut self, ready: &mut VecDeque<i32>, queued: &mut HashSet<i32>) {
        let current = self.lane_set.load_full();
        if Arc::ptr_eq(&current, &self.seen) {
            return;
        }
        let next: HashMap<i32, Arc<Lane>> =
            current.iter().map(|lane| (lane.id, lane.clone())).collect();
        for (id, old) in &self.lanes {
            match next.get(id) {
                Some(new) if !Arc::ptr_eq(new, old) => new.adopt(old),
                Some(_) => {}
                // Removed or disabled: its unsent events go back to the queue.
                None => self.release_pending(old),
            }
        }
        self.lanes = next;
        self.order = current.iter().map(|lane| lane.id).collect();
        for &id in &self.order {
            if queued.insert(id) {
                ready.push_back(id);
            }
        }
        self.seen = current;
    }

    /// Gives a lane's claimed but unsent events back to the queue, to be claimed again.
    fn release_pending(&self, lane: &Lane) {
        let unsent = lane.pending().take_all();
        for claimed in unsent {
            if let Some(outcome) = claimed.run.record(claimed.position, Fate::Release, None) {
                self.open.remove(claimed.run.id);
                let _ = self.finished.send(Settled::new(&claimed.run, outcome));
            }
        }
    }

    /// What one destination can take now, with `free` permits left in the pool.
    /// `others` is how many other destinations have work waiting or in flight: while there
    /// are any, this one holds at most its fair share of the pool, so a slow destination that
    /// could take every permit leaves room for the rest.
    fn plan(&self, lane: &Arc<Lane>, others: usize, free: usize) -> Plan {
        // Paused: nothing more starts, not even what was claimed before the pause; requests
        // in flight finish. Its claims return to the queue for after the resume.
        if lane.stats.paused.load(Ordering::Acquire) {
            self.release_pending(lane);
            return Plan::Now(Visit::Idle);
        }
        // Alone with work, a destination still leaves a quarter of the pool free when there are
        // others, so one that gets an event finds a permit at once instead of waiting for a
        // slow destination's request to end.
        let share = if others > 0 {
            self.pool_size / (others + 1)
        } else if self.lanes.len() > 1 {
            self.pool_size - self.pool_size / 4
        } else {
            self.pool_size
        }
        .max(1);
        let slots = lane
            .free_slots()
            .min(free)
            .min(share.saturating_sub(lane.occupied()));
        let waiting = lane.startable();
        // While requests are in flight, wait until a quarter of the slots are free: one claim
        // then starts several requests, instead of one query per finished request.
        let worth_a_claim = lane.quarter_of_slots();
        if slots == 0 || (waiting == 0 && slots < worth_a_claim && lane.occupied() > 0) {
            return Plan::Now(Visit::Busy);
        }
        // A rate-limited destination whose replay claim is out waits for it, rather than
        // spend tokens on a live claim that may find nothing; its return looks at it again.
        if waiting == 0 && lane.gate.is_limited() && lane.replay_claims.load(Ordering::Acquire) > 0
        {
            lane.replay_missed.store(true, Ordering::Release);
            return Plan::Now(Visit::Idle);
        }
        let batch = lane.config.batch_size.max(1);
        let requests = match lane
            .gate
            .take(slots.min(MAX_CLAIM / batch).max(1), Instant::now())
        {
            Ok(granted) => granted,
            Err(Closed::NotOwned) => return Plan::Now(Visit::Idle),
            Err(Closed::Until(until)) => {
                metrics::counter!("switchyard_rate_limited_total", "destination" => lane.config.name.clone())
                    .increment(1);
                return Plan::Now(Visit::WaitUntil(until));
            }
        };
        if waiting > 0 {
            return Plan::Start(requests);
        }
        // Runs are cut at ingest, so how full they are depends on the traffic: a backlog of
        // batches fills them, single events at a steady rate may make runs of one. A claim asks
        // for as many runs as the last claim's fill says will cover the requests it can start
        // (at most MAX_CLAIM events' worth of full runs); counting every run as full made a
        // claim of one-event runs start one request, and single events at 2,000/s queued for
        // seconds behind claims that could not keep up.
        let run_size = Lane::run_size(&lane.config);
        let fill = lane.run_fill().clamp(1, run_size);
        let limit = (requests * batch)
            .div_ceil(fill)
            .clamp(1, (MAX_CLAIM / run_size).max(1));
        Plan::Claim(Demand {
            requests,
            ask: store::Ask {
                destination_id: lane.id,
                limit,
                lease: lane.lease(limit * run_size),
                ordered: lane.config.ordering == config::Ordering::PerUser,
            },
        })
    }

    /// Claims live runs for several destinations in one statement (two when some deliver in
    /// per-user order) and starts what each got. With a thousand destinations getting an
    /// event or two each, claiming one destination at a time was a round trip per event, and
    /// the loop fell seconds behind. Destinations that got no live run claim replay runs off
    /// the loop ([`Scheduler::claim_replays`]).
    async fn claim_and_start(&self, asks: Vec<(Arc<Lane>, Demand)>) -> Vec<(i32, Visit)> {
        let live: Vec<store::Ask> = asks.iter().map(|(_, demand)| demand.ask).collect();
        let mut claimed = match self
            .store
            .claim_many(&live, self.instance, store::Lane::Live)
            .await
        {
            Ok(claimed) => claimed,
            Err(error) => {
                tracing::warn!(%error, destinations = asks.len(), "claiming work failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                return asks
                    .iter()
                    .map(|(lane, _)| (lane.id, Visit::Failed))
                    .collect();
            }
        };
        let mut visits = Vec::with_capacity(asks.len());
        let mut replay = Vec::new();
        for (lane, demand) in asks {
            match claimed.remove(&lane.id) {
                Some(runs) => {
                    visits.push((lane.id, self.start_claimed(&lane, &demand, runs, false)))
                }
                // What a replay claim brings comes back as a wake-up. A destination that is
                // replaying waits while replays make way for live traffic, unless it is
                // rate-limited: its limit bounds its replay, and the tokens this visit took
                // would be lost.
                None => match self.pace.held_until() {
                    Some(until)
                        if lane.replaying.load(Ordering::Acquire) && !lane.gate.is_limited() =>
                    {
                        visits.push((lane.id, Visit::WaitUntil(until)));
                    }
                    _ => {
                        visits.push((lane.id, Visit::Idle));
                        if lane.replay_claims.load(Ordering::Acquire) < REPLAY_CLAIMS {
                            if let Some(demand) = replay_share(&lane, demand) {
                                replay.push((lane, demand));
                            }
                        }
                    }
                },
            }
        }
        if !replay.is_empty() {
            self.claim_replays(replay);
        }
        visits
    }

    /// Claims replay runs for destinations with no live run due, in a task of its own: a claim
    /// of a thousand archived events takes milliseconds, and live events arriving meanwhile
    /// are claimed and sent without waiting for it. The permits and in-flight slots of the
    /// requests it may start are set aside until it comes back ([`Wake::Replayed`]). At most
    /// [`REPLAY_CLAIMS`] are out per destination.
    fn claim_replays(&self, asks: Vec<(Arc<Lane>, Demand)>) {
        let requests: usize = asks.iter().map(|(_, demand)| demand.requests).sum();
        // Counted among the free permits of this pass, so they are there.
        let Some(permits) = u32::try_from(requests)
            .ok()
            .and_then(|n| self.permits.clone().try_acquire_many_owned(n).ok())
        else {
            return;
        };
        for (lane, demand) in &asks {
            lane.replay_claims.fetch_add(1, Ordering::AcqRel);
            lane.reserved.fetch_add(demand.requests, Ordering::AcqRel);
        }
        let store = self.store.clone();
        let instance = self.instance;
        let wake = self.wake.clone();
        let finished = self.finished.clone();
        self.deliveries.spawn(async move {
            let ask: Vec<store::Ask> = asks.iter().map(|(_, demand)| demand.ask).collect();
            let claimed = match store.claim_many(&ask, instance, store::Lane::Replay).await {
                Ok(claimed) => Some(claimed),
                Err(error) => {
                    tracing::warn!(%error, destinations = ask.len(), "claiming replay work failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    None
                }
            };
            let claim = ReplayClaim {
                asks,
                claimed,
                permits: Some(permits),
            };
            if let Err(mpsc::error::SendError(Wake::Replayed(claim))) =
                wake.send(Wake::Replayed(claim))
            {
                claim.release(&finished);
            }
        });
    }

    /// Starts what a replay claim brought back, for the destinations still in force.
    fn replay_claimed(&self, mut claim: ReplayClaim) -> Vec<(i32, Visit)> {
        let failed = claim.claimed.is_none();
        let mut claimed = claim.settle();
        if !claimed.is_empty() {
            self.pace.claimed();
        }
        let mut visits = Vec::with_capacity(claim.asks.len());
        for (lane, demand) in &claim.asks {
            let current = self
                .lanes
                .get(&lane.id)
                .is_some_and(|now| Arc::ptr_eq(now, lane));
            let runs = claimed.remove(&lane.id);
            if !failed {
                lane.replaying.store(runs.is_some(), Ordering::Release);
            }
            let visit = match runs {
                Some(runs) if current && !lane.stats.paused.load(Ordering::Acquire) => {
                    self.start_claimed(lane, demand, runs, true)
                }
                // Reloaded away or paused meanwhile: back to the queue.
                Some(runs) => {
                    for run in runs {
                        release_run(run, lane.id, demand.ask.ordered, &self.finished);
                    }
                    continue;
                }
                None if failed => Visit::Failed,
                None => Visit::Idle,
            };
            if !current {
                continue;
            }
            // Passed over while the claim was out: it is looked at again.
            let missed = lane.replay_missed.swap(false, Ordering::AcqRel);
            let visit = match visit {
                Visit::Dispatched { more } => Visit::Dispatched {
                    more: more || missed,
                },
                Visit::Idle if missed => Visit::Busy,
                visit => visit,
            };
            visits.push((lane.id, visit));
        }
        visits
    }

    /// Queues a claim's runs in the lane and starts the requests set aside for them.
    fn start_claimed(
        &self,
        lane: &Arc<Lane>,
        demand: &Demand,
        runs: Vec<store::ClaimedRun>,
        replay: bool,
    ) -> Visit {
        let claimed_all = runs.len() == demand.ask.limit;
        let events: usize = runs.iter().map(|run| run.events.len()).sum();
        lane.note_run_fill(events / runs.len().max(1));
        {
            let mut pending = lane.pending();
            for run in runs {
                let (progress, events) = RunProgress::start(run, lane.id, demand.ask.ordered);
                self.open.insert(progress.clone());
                for (position, event) in events.into_iter().enumerate() {
                    let claimed = Claimed {
                        run: progress.clone(),
                        position,
                        event,
                    };
                    pending.push(claimed, replay);
                }
            }
        }
        self.start(lane, demand.requests, claimed_all)
    }

    /// [`Scheduler::claim_and_start`], then files each destination after its visit; true if
    /// any started something.
    async fn claim_and_settle(
        &self,
        asks: Vec<(Arc<Lane>, Demand)>,
        ready: &mut VecDeque<i32>,
        queued: &mut HashSet<i32>,
        timers: &mut BTreeMap<Instant, Vec<i32>>,
    ) -> bool {
        let mut progressed = false;
        for (id, visit) in self.claim_and_start(asks).await {
            progressed |= settle(id, visit, ready, queued, timers);
        }
        progressed
    }

    /// Starts up to `requests` requests from a destination's claimed events, each holding a
    /// permit.
    fn start(&self, lane: &Arc<Lane>, requests: usize, claimed_all: bool) -> Visit {
        let batch = lane.config.batch_size.max(1);
        for _ in 0..requests {
            let replay_room = lane.replay_room() > 0;
            let (claimed, replay) = lane.pending().next_request(batch, replay_room);
            if claimed.is_empty() {
                break;
            }
            let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                // Only this loop takes permits, so the count above holds; never drop claims.
                unreachable!("permits were counted before claiming");
            };
            lane.in_flight.fetch_add(1, Ordering::AcqRel);
            if replay {
                lane.replay_in_flight.fetch_add(1, Ordering::AcqRel);
            }
            let lane = lane.clone();
            let finished = self.finished.clone();
            let wake = self.wake.clone();
            let open = self.open.clone();
            self.deliveries.spawn(async move {
                let settled = deliver(&lane, &open, claimed).await;
                if replay {
                    lane.replay_in_flight.fetch_sub(1, Ordering::AcqRel);
                }
                lane.in_flight.fetch_sub(1, Ordering::AcqRel);
                drop(permit);
                for settled in settled {
                    let _ = finished.send(settled);
                }
                let _ = wake.send(Wake::Destinations(vec![lane.id]));
            });
        }
        let more = claimed_all || lane.startable() > 0;
        Visit::Dispatched { more }
    }
}

/// A replay claim's demand, cut to the slots a replay may take ([`Lane::replay_room`]); none
/// when it has none left.
fn replay_share(lane: &Lane, mut demand: Demand) -> Option<Demand> {
    let room = lane.replay_room();
    if room == 0 {
        return None;
    }
    if room < demand.requests {
        demand.ask.limit = (demand.ask.limit * room).div_ceil(demand.requests).max(1);
        demand.requests = room;
    }
    Some(demand)
}

/// What a destination can take in this pass.
enum Plan {
    /// Nothing: this is the visit's outcome.
    Now(Visit),
    /// This many requests, from events claimed before.
    Start(usize),
    /// A claim first.
    Claim(Demand),
}

struct Demand {
    /// Requests that may start (permits and tokens are set aside for them).
    requests: usize,
    ask: store::Ask,
}

enum Visit {
    Dispatched { more: bool },
    Busy,
    WaitUntil(Instant),
    Idle,
    Failed,
}

/// Files a destination after its visit; true if it started anything.
fn settle(
    id: i32,
    visit: Visit,
    ready: &mut VecDeque<i32>,
    queued: &mut HashSet<i32>,
    timers: &mut BTreeMap<Instant, Vec<i32>>,
) -> bool {
    match visit {
        Visit::Dispatched { more } => {
            if more {
                ready.push_back(id);
            } else {
                queued.remove(&id);
            }
            return true;
        }
        // Busy: it stays ready and is looked at again when a slot frees up. Failed: again
        // after the pause the failure took.
        Visit::Busy | Visit::Failed => ready.push_back(id),
        // Out of tokens or paused: set aside until then, holding nothing.
        Visit::WaitUntil(until) => {
            queued.remove(&id);
            timers.entry(until).or_default().push(id);
        }
        // Empty, or its key is leased elsewhere: woken by new work or the lease.
        Visit::Idle => {
            queued.remove(&id);
        }
    }
    false
}

/// Files a destination after a replay claim of its came back. Unlike a visit of the loop's,
/// this one may find the destination ready already (new work woke it meanwhile): it is then
/// left where it is, once. Filed a second time, it was visited twice in one pass, the second
/// claim found nothing (the first had taken it all) and filed it as idle while it was still
/// ready, and from then on every wake-up added another copy: with a deep queue, each pass
/// claimed for one destination two and three times over.
fn settle_replayed(
    id: i32,
    visit: Visit,
    ready: &mut VecDeque<i32>,
    queued: &mut HashSet<i32>,
    timers: &mut BTreeMap<Instant, Vec<i32>>,
) -> bool {
    if queued.insert(id) {
        settle(id, visit, ready, queued, timers)
    } else {
        matches!(visit, Visit::Dispatched { .. })
    }
}

/// Moves destinations whose timers have come to the front of the ready queue, in the order
/// they were set aside. They waited for a token or a pause: a destination ready again after
/// a claim that ran past another's timer, visited first, took the token that timer was set
/// for, and got two turns in a row on a key the two share.
fn fire_timers(
    timers: &mut BTreeMap<Instant, Vec<i32>>,
    ready: &mut VecDeque<i32>,
    queued: &mut HashSet<i32>,
) {
    let now = Instant::now();
    let mut fired = Vec::new();
    while let Some(entry) = timers.first_entry() {
        if *entry.key() > now {
            break;
        }
        fired.extend(entry.remove().into_iter().filter(|id| queued.insert(*id)));
    }
    for id in fired.into_iter().rev() {
        ready.push_front(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop's bookkeeping: destinations ready to visit, and which ones those are.
    #[derive(Default)]
    struct Rounds {
        ready: VecDeque<i32>,
        queued: HashSet<i32>,
        timers: BTreeMap<Instant, Vec<i32>>,
    }

    impl Rounds {
        fn wake(&mut self, id: i32) {
            if self.queued.insert(id) {
                self.ready.push_back(id);
            }
        }

        /// One pass of the loop, each ready destination visited with `visit`.
        fn pass(&mut self, visit: impl Fn(i32) -> Visit) -> Vec<i32> {
            let mut visited = Vec::new();
            for _ in 0..self.ready.len() {
                let Some(id) = self.ready.pop_front() else {
                    break;
                };
                visited.push(id);
                settle(
                    id,
                    visit(id),
                    &mut self.ready,
                    &mut self.queued,
                    &mut self.timers,
                );
            }
            visited
        }

        fn replayed(&mut self, id: i32, visit: Visit) -> bool {
            settle_replayed(
                id,
                visit,
                &mut self.ready,
                &mut self.queued,
                &mut self.timers,
            )
        }
    }

    #[test]
    fn a_replay_claim_coming_back_to_a_ready_destination_leaves_it_ready_once() {
        let mut rounds = Rounds::default();
        // Its live claim found nothing: idle, and a replay claim goes out.
        rounds.wake(1);
        assert_eq!(rounds.pass(|_| Visit::Idle), [1]);
        assert!(rounds.ready.is_empty());
        // New live work wakes it before the replay claim is back.
        rounds.wake(1);
        assert!(rounds.replayed(1, Visit::Dispatched { more: true }));
        assert_eq!(rounds.ready, [1], "ready once");
        // Visited once per pass from then on, however often it is woken.
        assert_eq!(rounds.pass(|_| Visit::Dispatched { more: true }), [1]);
        rounds.wake(1);
        assert_eq!(rounds.pass(|_| Visit::Dispatched { more: true }), [1]);
        assert_eq!(rounds.ready, [1]);
    }

    #[test]
    fn destinations_whose_timers_came_go_before_those_ready_again() {
        let mut rounds = Rounds::default();
        let (earlier, later) = (
            Instant::now() - Duration::from_millis(2),
            Instant::now() - Duration::from_millis(1),
        );
        // 1 took the key's token and is ready again after its claim; 3 and then 2 were told to
        // wait for the next, which has come by the next pass.
        for id in [1, 3, 2] {
            rounds.wake(id);
        }
        rounds.pass(|id| match id {
            1 => Visit::Dispatched { more: true },
            3 => Visit::WaitUntil(earlier),
            _ => Visit::WaitUntil(later),
        });
        assert_eq!(rounds.ready, [1]);
        fire_timers(&mut rounds.timers, &mut rounds.ready, &mut rounds.queued);
        assert_eq!(rounds.ready, [3, 2, 1]);
        assert!(rounds.timers.is_empty());
    }

    #[test]
    fn a_replay_claim_coming_back_to_an_idle_destination_files_it() {
        let mut rounds = Rounds::default();
        assert!(rounds.replayed(2, Visit::Dispatched { more: true }));
        assert_eq!(rounds.ready, [2]);
        assert!(!rounds.replayed(3, Visit::Idle));
        assert!(!rounds.queued.contains(&3));
        let until = Instant::now() + Duration::from_secs(1);
        assert!(!rounds.replayed(4, Visit::WaitUntil(until)));
        assert_eq!(rounds.timers.get(&until), Some(&vec![4]));
    }
}
