//! Routing: which destinations get a message, by `sources`, `events`, Segment's
//! `integrations` object and each destination's gate (`where`, `consent`, `sample`).

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

/// Destinations of one source, and the rule for each.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    routes: Vec<Route>,
}

impl Routes {
    pub fn new(routes: Vec<Route>) -> Routes {
        Routes { routes }
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

    /// The destinations that get `message` from `source_id`. The filters that read the event
    /// parse it once for all of them; each one dropped is counted in
    /// `switchyard_filtered_events_total`.
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
        for route in self.routes.iter() {
            match route.routing(source_id, message) {
                Ok(()) => {}
                Err(None) => continue,
                Err(Some(reason)) => {
                    route.count_filtered(reason);
                    // Not subscribed (`events`) is not written into the event's trail, which
                    // would otherwise hold a line per destination for every event; the event's
                    // path works it out when it is read (`EventTrail::unsubscribed`).
                    if reason != Reason::Events {
                        filtered.push((route.destination_id, reason.as_str()));
                    }
                    continue;
                }
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

    /// The route of the destination called `name`.
    pub fn find(&self, name: &str) -> Option<&Route> {
        self.routes.iter().find(|route| route.name == name)
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
}
