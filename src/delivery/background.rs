//! The pool's tasks beside the scheduling loop: forwarding `NOTIFY`s, holding rate-limit key
//! leases, and sweeping the claims of processes that died.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::delivery::lane::LaneSet;
use crate::delivery::scheduler::Wake;
use crate::delivery::traffic::KeyGate;
use crate::store::{self, JobsNotice, Store};

/// How often dead processes are looked for.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How often rate-limit key leases are renewed, and how long one lasts unrenewed.
const LEASE_EVERY: Duration = Duration::from_secs(3);
const LEASE_TTL: Duration = Duration::from_secs(15);

/// Forwards `NOTIFY`s to the scheduling loop. After a lost connection it asks for a full look,
/// since notifications may have been missed meanwhile.
pub(super) async fn listen(
    store: Store,
    wake: mpsc::UnboundedSender<Wake>,
    stop: CancellationToken,
) {
    loop {
        let mut listener = match store.listen_jobs().await {
            Ok(listener) => listener,
            Err(error) => {
                tracing::warn!(%error, "LISTEN connection failed; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        let _ = wake.send(Wake::All);
        loop {
            let notice = tokio::select! {
                _ = stop.cancelled() => return,
                n = listener.next() => n,
            };
            let message = match notice {
                Ok(JobsNotice::Destinations(ids)) => Wake::Destinations(ids),
                Ok(JobsNotice::All) => Wake::All,
                Err(error) => {
                    tracing::warn!(%error, "LISTEN connection lost; reconnecting");
                    break;
                }
            };
            if wake.send(message).is_err() {
                return;
            }
        }
    }
}

/// Holds the leases of rate-limit keys: renews the ones this process has, and takes free ones
/// up to its fair share (keys / processes), giving back any above it so a process that joins
/// gets its part. A key's destinations are woken when this process gains it.
pub(super) async fn lease_keys(
    store: Store,
    lanes: LaneSet,
    instance: i32,
    wake: mpsc::UnboundedSender<Wake>,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(LEASE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                if let Err(error) = store.release_keys(instance).await {
                    tracing::debug!(%error, "releasing key leases failed; they expire");
                }
                return;
            }
            _ = every.tick() => {}
        }
        let mut gates: HashMap<String, (Arc<KeyGate>, Vec<i32>)> = HashMap::new();
        for lane in lanes.load().iter().filter(|lane| lane.gate.is_limited()) {
            gates
                .entry(lane.gate.digest.clone())
                .or_insert_with(|| (lane.gate.clone(), Vec::new()))
                .1
                .push(lane.id);
        }
        if gates.is_empty() {
            continue;
        }
        match rebalance(&store, &gates, instance).await {
            Ok(gained) => {
                if !gained.is_empty() && wake.send(Wake::Destinations(gained)).is_err() {
                    return;
                }
            }
            Err(error) => {
                tracing::warn!(%error, "renewing rate-limit key leases failed");
                // Without a renewed lease another process may take the key: stop using it.
                for (gate, _) in gates.values() {
                    gate.set_owned(false);
                }
            }
        }
    }
}

/// One lease round; returns the destinations whose key this process just gained.
async fn rebalance(
    store: &Store,
    gates: &HashMap<String, (Arc<KeyGate>, Vec<i32>)>,
    instance: i32,
) -> store::Result<Vec<i32>> {
    let processes = store.delivering_instances().await?.max(1) as usize;
    let share = gates.len().div_ceil(processes);
    let mine: Vec<String> = gates
        .iter()
        .filter(|(_, (gate, _))| gate.owned())
        .map(|(digest, _)| digest.clone())
        .take(share)
        .collect();
    let elsewhere: HashSet<String> = store
        .keys_held_elsewhere(instance)
        .await?
        .into_iter()
        .collect();
    let mut wanted = mine.clone();
    for digest in gates.keys() {
        if wanted.len() >= share {
            break;
        }
        if !mine.contains(digest) && !elsewhere.contains(digest) {
            wanted.push(digest.clone());
        }
    }
    let held: HashSet<String> = store
        .lease_keys(&wanted, instance, LEASE_TTL)
        .await?
        .into_iter()
        .collect();
    let surplus: Vec<String> = gates
        .iter()
        .filter(|(digest, (gate, _))| gate.owned() && !held.contains(*digest))
        .map(|(digest, _)| digest.clone())
        .collect();
    if !surplus.is_empty() {
        store.release_key_leases(&surplus, instance).await?;
    }
    let mut gained = Vec::new();
    for (digest, (gate, lanes)) in gates {
        let owned = held.contains(digest);
        if gate.set_owned(owned) && owned {
            gained.extend(lanes.iter().copied());
        }
    }
    Ok(gained)
}

/// Releases the claims of processes that died, so their work is retried at once instead of
/// when the leases run out.
pub(super) async fn sweep(
    store: Store,
    instance: i32,
    wake: mpsc::UnboundedSender<Wake>,
    stop: CancellationToken,
) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = every.tick() => {}
        }
        match store.release_dead_instances(instance).await {
            Ok(0) => {}
            Ok(released) => {
                tracing::info!(released, "released the claims of a process that died");
                let _ = wake.send(Wake::All);
            }
            Err(error) => tracing::debug!(%error, "sweeping dead processes failed"),
        }
    }
}
