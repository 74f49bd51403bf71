//! Routing: which destinations get a message, by `sources`, `events`, Segment's
//! `integrations` object and each destination's gate (`where`, `consent`, `sample`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};
use time::OffsetDateTime;

use super::Message;
use crate::destination::Call;
use crate::filter::Reason;
use crate::store::Target;
use crate::trail::EventTrail;

/// One destination's routing rules.
#[derive(Debug, Clone)]
pub struct Route {
    pub destination_id: i32,
    pub name: String,
    pub kind: String,
    /// The kind's name in Segment's catalog (`"Amplitude"`).
    pub catalog_name: String,
    /// Source ids it receives from (`None`: all).
    pub sources: Option<Vec<i32>>,
    /// Event names or call types (`None`: all).
    pub events: Option<Vec<String>>,
    /// `ordering = "per_user"`.
    pub ordered: bool,
    /// Events per queued run.
    pub run_size: usize,
    /// `where`, `consent` and `sample`, checked after `sources`, `integrations` and `events`.
    pub gate: crate::filter::Gate,
    /// Its `switchyard_filtered_events_total` counters, one per [`Reason`], each looked up
    /// once: with a thousand destinations each taking a few event names, every event is "not
    /// one of the `events`" for almost all of them.
    pub filtered: [std::sync::OnceLock<metrics::Counter>; Reason::ALL.len()],
}

impl Route {
    /// Whether `sources`, the message's `integrations` and `events` let it through.
    pub fn accepts(&self, source_id: i32, message: &Message) -> bool {
        self.routing(source_id, message).is_ok()
    }

    /// Lets the message through, or says why not: `Err(None)` when the destination does not
    /// take its source (not a filter: the event was never meant for it), else the first of
    /// `integrations` and `events` (in that order) that stops it.
    pub fn routing(&self, source_id: i32, message: &Message) -> Result<(), Option<Reason>> {
        if !self.takes_source(source_id) {
            return Err(None);
        }
        if !integrations_allow(
            message.integrations.as_ref(),
            [&self.name, &self.kind, &self.catalog_name],
        ) {
            return Err(Some(Reason::Integrations));
        }
        if !self.subscribed(message.call, message.event.as_deref()) {
            return Err(Some(Reason::Events));
        }
        Ok(())
    }

    /// Its `where`, `consent` and `sample` on a stored event. The event is parsed into
    /// `parsed` only when one of them reads it, so the routes an event is checked against
    /// parse it once between them.
    pub fn check_gate(
        &self,
        message_id: &str,
        payload: &[u8],
        parsed: &mut Option<Value>,
    ) -> Result<(), Reason> {
        let event = match self.gate.reads_event() {
            true => &*parsed
                .get_or_insert_with(|| serde_json::from_slice(payload).unwrap_or(Value::Null)),
            false => &Value::Null,
        };
        self.gate.check(&self.name, message_id, event)
    }

    /// Counts one event its rules stopped, for `reason`.
    pub fn count_filtered(&self, reason: Reason) {
        self.filtered[reason as usize]
            .get_or_init(|| crate::filter::counter(&self.name, reason))
            .increment(1);
    }

    /// Whether its `events` take this call type or event name.
    pub fn subscribed(&self, call: Call, event: Option<&str>) -> bool {
        self.events.as_ref().is_none_or(|events| {
            events
                .iter()
                .any(|e| e == call.as_str() || event == Some(e.as_str()))
        })
    }

    /// Whether it takes events from `source_id` at all.
    pub fn takes_source(&self, source_id: i32) -> bool {
        self.sources
            .as_ref()
            .is_none_or(|sources| sources.contains(&source_id))
    }
}

/// Segment's `integrations` object: `{"All": false, "Amplitude": true}` turns every destination
/// off but the named ones; `{"Amplitude": false}` turns one off. Names are matched exactly
/// (case-sensitive) against the destination's name, its kind, or the kind's catalog name, in
/// that order: the most specific setting wins.
pub(super) fn integrations_allow(
    integrations: Option<&Map<String, Value>>,
    names: [&str; 3],
) -> bool {
    let Some(integrations) = integrations else {
        return true;
    };
    let setting = |key: &str| match integrations.get(key) {
        Some(Value::Bool(on)) => Some(*on),
        // An options object (as Segment allows) means "on".
        Some(Value::Object(_)) => Some(true),
        _ => None,
    };
    names
        .into_iter()
        .find_map(setting)
        .or_else(|| setting("All"))
        .unwrap_or(true)
}

/// Every enabled destination's routing rules, indexed by the names in their `events`, so that
/// routing an event costs what its own destinations cost, not a look at every destination.
#[derive(Debug, Default)]
pub struct Routes {
    routes: Vec<Route>,
    /// Positions of the routes with an `events` list, by each name in it (event names and
    /// call types alike).
    by_name: HashMap<String, Vec<usize>>,
    /// Positions of the routes without one: they are subscribed to everything.
    open: Vec<usize>,
    unsubscribed: Unsubscribed,
}

/// `switchyard_filtered_events_total{reason="events"}`, counted without a step per destination
/// and event: with 10,000 destinations each taking one event name, incrementing 9,999 counters
/// per event took most of the ingest's time. An event whose `integrations` turn nothing off
/// is counted once for its source, and once for each destination subscribed to it; a
/// destination's count is then the events of its sources less those it was subscribed to.
/// Events whose `integrations` turn something off are routed by looking at every destination,
/// and counted per destination as before.
#[derive(Debug, Default)]
struct Unsubscribed {
    /// Per source id: events routed through the index.
    indexed: HashMap<i32, AtomicU64>,
    /// Per route: of those events, from its sources, the ones it was subscribed to.
    subscribed: Vec<AtomicU64>,
    /// Per route: events not subscribed to, found by looking at every destination.
    counted: Vec<AtomicU64>,
    /// Per route: the count before the reload that made these routes.
    carried: Vec<u64>,
}

impl Routes {
    /// The routes of the destinations, in config order; `sources` are every source's id.
    pub fn new(routes: Vec<Route>, sources: impl IntoIterator<Item = i32>) -> Routes {
        let mut by_name: HashMap<String, Vec<usize>> = HashMap::new();
        let mut open = Vec::new();
        for (position, route) in routes.iter().enumerate() {
            match &route.events {
                Some(names) => {
                    for name in names {
                        let positions = by_name.entry(name.clone()).or_default();
                        if positions.last() != Some(&position) {
                            positions.push(position);
                        }
                    }
                }
                None => open.push(position),
            }
        }
        let zeros = || routes.iter().map(|_| AtomicU64::new(0)).collect();
        let unsubscribed = Unsubscribed {
            indexed: sources
                .into_iter()
                .map(|id| (id, AtomicU64::new(0)))
                .collect(),
            subscribed: zeros(),
            counted: zeros(),
            carried: vec![0; routes.len()],
        };
        Routes {
            routes,
            by_name,
            open,
            unsubscribed,
        }
    }

    /// Carries the "not subscribed" counts of the routes a reload replaces, by destination
    /// name, so the counters go on from where they were.
    pub fn carry_counts(mut self, previous: &Routes) -> Routes {
        for (position, route) in self.routes.iter().enumerate() {
            if let Some(old) = previous.routes.iter().position(|r| r.name == route.name) {
                self.unsubscribed.carried[position] = previous.unsubscribed_count(old);
            }
        }
        self
    }

    /// Every route, in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// The route to one destination, if it is configured and enabled.
    pub fn route(&self, destination_id: i32) -> Option<&Route> {
        self.routes
            .iter()
            .find(|route| route.destination_id == destination_id)
    }

    /// The route of the destination called `name`.
    pub fn find(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|route| route.name == name)
    }

    /// The destinations that get `message` from `source_id`. The filters that read the event
    /// parse it once for all of them; each one dropped is counted in
    /// `switchyard_filtered_events_total` (see [`Routes::publish_counts`] for `events`).
    /// Also returns the routing for the event trail ([`crate::trail`]), with the filters that
    /// stopped it, to be recorded once the event is stored.
    pub fn targets(
        &self,
        source_id: i32,
        message: &Message,
        received_at: OffsetDateTime,
    ) -> (Vec<Target>, EventTrail) {
        let mut parsed: Option<Value> = None;
        let mut targets = Vec::new();
        let mut filtered: Vec<(i32, &'static str)> = Vec::new();
        let candidates = self.candidates(source_id, message);
        let positions: Box<dyn Iterator<Item = usize>> = match &candidates {
            Some(positions) => Box::new(positions.iter().copied()),
            None => Box::new(0..self.routes.len()),
        };
        for position in positions {
            let route = &self.routes[position];
            match route.routing(source_id, message) {
                Ok(()) => {}
                Err(None) => continue,
                // Not subscribed (`events`) is not written into the event's trail, which
                // would otherwise hold a line per destination for every event; the event's
                // path works it out when it is read (`EventTrail::unsubscribed`).
                Err(Some(Reason::Events)) => {
                    self.unsubscribed.counted[position].fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Err(Some(reason)) => {
                    route.count_filtered(reason);
                    filtered.push((route.destination_id, reason.as_str()));
                    continue;
                }
            }
            if candidates.is_some() && route.events.is_some() {
                self.unsubscribed.subscribed[position].fetch_add(1, Ordering::Relaxed);
            }
            if let Err(reason) =
                route.check_gate(&message.message_id, &message.payload, &mut parsed)
            {
                route.count_filtered(reason);
                filtered.push((route.destination_id, reason.as_str()));
                continue;
            }
            targets.push(Target {
                destination_id: route.destination_id,
                ordered: route.ordered,
                run_size: route.run_size,
            });
        }
        let routed = targets.iter().map(|t| (t.destination_id, None));
        let stopped = filtered.into_iter().map(|(id, reason)| (id, Some(reason)));
        let trail = EventTrail::new(
            &message.message_id,
            source_id,
            &message.user_key,
            received_at,
            routed.chain(stopped),
        )
        .named(message.call, message.event.as_deref());
        (targets, trail)
    }

    /// The positions of the routes subscribed to `message`, in config order, when its
    /// `integrations` turn no destination off (then the others are simply not subscribed, and
    /// the event is counted for its source); `None` when every route must be looked at.
    fn candidates(&self, source_id: i32, message: &Message) -> Option<Vec<usize>> {
        let turns_off = message
            .integrations
            .as_ref()
            .is_some_and(|map| map.values().any(|v| v == &Value::Bool(false)));
        let counter = self.unsubscribed.indexed.get(&source_id);
        // With no `events` list anywhere every destination is a candidate: looking at each in
        // turn costs no list per event, and there is nothing to count.
        if turns_off || counter.is_none() || self.by_name.is_empty() {
            return None;
        }
        counter?.fetch_add(1, Ordering::Relaxed);
        let mut positions = self.open.clone();
        let names = [Some(message.call.as_str()), message.event.as_deref()];
        for name in names.into_iter().flatten() {
            if let Some(subscribed) = self.by_name.get(name) {
                positions.extend_from_slice(subscribed);
            }
        }
        positions.sort_unstable();
        positions.dedup();
        Some(positions)
    }

    /// The events of its sources the route at `position` was not subscribed to, since the
    /// process started.
    fn unsubscribed_count(&self, position: usize) -> u64 {
        let counts = &self.unsubscribed;
        let route = &self.routes[position];
        if route.events.is_none() {
            return counts.carried[position];
        }
        let indexed: u64 = counts
            .indexed
            .iter()
            .filter(|(source, _)| route.takes_source(**source))
            .map(|(_, count)| count.load(Ordering::Relaxed))
            .sum();
        let subscribed = counts.subscribed[position].load(Ordering::Relaxed);
        counts.carried[position]
            + counts.counted[position].load(Ordering::Relaxed)
            + indexed.saturating_sub(subscribed)
    }

    /// Writes each destination's `switchyard_filtered_events_total{reason="events"}`; called
    /// before the metrics are read.
    pub fn publish_counts(&self) {
        for (position, route) in self.routes.iter().enumerate() {
            if route.events.is_some() {
                route.filtered[Reason::Events as usize]
                    .get_or_init(|| crate::filter::counter(&route.name, Reason::Events))
                    .absolute(self.unsubscribed_count(position));
            }
        }
    }
}

#[cfg(test)]
mod scale_tests {
    use super::*;

    /// A thousand webhooks each taking one event name: an event's trail keeps a line for the
    /// one it went to, not one per destination (50,000 such trails held 2.7 GB), and its path
    /// still names the others as not subscribed.
    #[test]
    fn a_trail_keeps_no_line_per_unsubscribed_destination() {
        let routes = Routes::new(
            (0..1_000)
                .map(|i| Route {
                    destination_id: i,
                    name: format!("d{i}"),
                    kind: "webhook".into(),
                    catalog_name: "Webhooks".into(),
                    sources: None,
                    events: Some(vec![format!("E{i}")]),
                    ordered: false,
                    run_size: 1,
                    gate: Default::default(),
                    filtered: Default::default(),
                })
                .collect(),
            [1],
        );
        let stored = serde_json::json!({"type": "track", "event": "E7", "messageId": "m",
                                        "userId": "u"});
        let message = Message::from_stored(&serde_json::to_vec(&stored).unwrap()).unwrap();
        let (targets, trail) = routes.targets(1, &message, OffsetDateTime::now_utc());
        assert_eq!(targets.len(), 1);
        assert_eq!(trail.routes.len(), 1);
        let unsubscribed: Vec<i32> = trail
            .unsubscribed(&routes)
            .map(|r| r.destination_id)
            .collect();
        assert_eq!(unsubscribed.len(), 999);
        assert!(!unsubscribed.contains(&7));
    }

    fn route(id: i32, events: Option<&[&str]>, sources: Option<Vec<i32>>) -> Route {
        Route {
            destination_id: id,
            name: format!("d{id}"),
            kind: "webhook".into(),
            catalog_name: "Webhooks".into(),
            sources,
            events: events.map(|names| names.iter().map(|n| n.to_string()).collect()),
            ordered: false,
            run_size: 1,
            gate: Default::default(),
            filtered: Default::default(),
        }
    }

    fn send(routes: &Routes, source: i32, event: &str, integrations: Value) -> Vec<i32> {
        let stored = serde_json::json!({"type": "track", "event": event, "messageId": "m",
                                        "userId": "u", "integrations": integrations});
        let message = Message::from_stored(&serde_json::to_vec(&stored).unwrap()).unwrap();
        let (targets, _) = routes.targets(source, &message, OffsetDateTime::now_utc());
        targets.iter().map(|t| t.destination_id).collect()
    }

    /// "Not one of its `events`" is counted per destination whichever way an event was
    /// routed (by the index, or by looking at every destination when its `integrations` turn
    /// one off), and a reload's routes go on from the old count.
    #[test]
    fn unsubscribed_events_are_counted_per_destination_by_either_path() {
        let make = || {
            Routes::new(
                vec![
                    route(0, Some(&["A"]), None),
                    route(1, Some(&["B", "track"]), Some(vec![2])),
                    route(2, None, None),
                ],
                [1, 2],
            )
        };
        let routes = make();
        let none = serde_json::json!({});
        assert_eq!(send(&routes, 1, "A", none.clone()), [0, 2]);
        assert_eq!(send(&routes, 1, "B", none.clone()), [2]);
        assert_eq!(send(&routes, 1, "C", none.clone()), [2]);
        assert_eq!(send(&routes, 2, "B", none.clone()), [1, 2]);
        assert_eq!(
            send(&routes, 2, "A", none.clone()),
            [0, 1, 2],
            "`track` takes A"
        );
        // Turned off by `integrations`: not counted as unsubscribed.
        assert_eq!(send(&routes, 1, "B", serde_json::json!({"d0": false})), [2]);
        // Another one turned off, so every destination is looked at: d0 is unsubscribed.
        assert_eq!(send(&routes, 1, "C", serde_json::json!({"d1": false})), [2]);
        let counts = |routes: &Routes| -> Vec<u64> {
            (0..3).map(|p| routes.unsubscribed_count(p)).collect()
        };
        assert_eq!(counts(&routes), [4, 0, 0]);
        let reloaded = make().carry_counts(&routes);
        assert_eq!(counts(&reloaded), [4, 0, 0]);
        send(&reloaded, 2, "C", none);
        assert_eq!(
            counts(&reloaded),
            [5, 0, 0],
            "C is a `track` call, which d1 takes"
        );
    }
}
