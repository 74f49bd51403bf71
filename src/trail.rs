//! Where recent events went: a bounded in-memory ring of the last events this process routed
//! (`[server] event_trail`, [`DEFAULT_CAPACITY`] unless set; 0 records nothing), each with the destinations it was routed to or filtered from and every
//! delivery attempt this process made. It answers `GET /admin/v1/events/{messageId}`.
//!
//! It is per process, shared by every server in it (only tests run several), keyed by
//! messageId; another process's attempts are not here, and it forgets on restart: it is
//! an operator's "did my event get there?", not an audit log. Recording is one short mutex
//! hold per ingest request and per delivery request. An event is ids and times, no payload:
//! with two destinations and an attempt each, a full ring measured ≈ 23 MB of RSS (≈ 460
//! bytes an event, allocator overhead included).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

use time::OffsetDateTime;

use crate::destination::Call;
use crate::ingest::{Route, Routes};

/// Events kept unless `[server] event_trail` says otherwise; the oldest is forgotten when a
/// new one comes.
pub const DEFAULT_CAPACITY: usize = 50_000;
/// Attempts kept per destination (the first ones and the last ones are what matters).
const MAX_ATTEMPTS: usize = 8;
/// Errors are cut to this many bytes.
const MAX_ERROR: usize = 300;

/// This process's trail.
pub static TRAIL: LazyLock<Trail> = LazyLock::new(|| Trail::new(DEFAULT_CAPACITY));

/// What happened to an event at one destination so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Queued,
    Retrying,
    Delivered,
    Dead,
    Filtered(&'static str),
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Retrying => "retrying",
            State::Delivered => "delivered",
            State::Dead => "dead",
            State::Filtered(_) => "filtered",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Attempt {
    pub at: OffsetDateTime,
    pub status: Option<u16>,
    pub error: Option<Box<str>>,
}

#[derive(Debug, Clone)]
pub struct RouteTrail {
    pub destination_id: i32,
    pub state: State,
    pub attempts: Vec<Attempt>,
}

#[derive(Debug, Clone)]
pub struct EventTrail {
    pub message_id: Box<str>,
    pub source_id: i32,
    /// [`user_hash`] of its userId (else anonymousId), for the search by user.
    pub user: u64,
    pub received_at: OffsetDateTime,
    /// The destinations routing sent it to or a filter stopped, with what became of it. Those
    /// not subscribed to it (their `events`) are not kept: [`EventTrail::unsubscribed`].
    pub routes: Vec<RouteTrail>,
    /// Its call type and event name, for [`EventTrail::unsubscribed`].
    pub call: Call,
    pub event: Option<Box<str>>,
}

impl EventTrail {
    /// An accepted event and where routing sent it: `routes` are destination ids, each with the
    /// filter that stopped it, if any.
    pub fn new(
        message_id: &str,
        source_id: i32,
        user: &str,
        received_at: OffsetDateTime,
        routes: impl IntoIterator<Item = (i32, Option<&'static str>)>,
    ) -> EventTrail {
        EventTrail {
            message_id: message_id.into(),
            source_id,
            user: user_hash(user),
            received_at,
            routes: routes
                .into_iter()
                .map(|(destination_id, filtered)| RouteTrail {
                    destination_id,
                    state: filtered.map_or(State::Queued, State::Filtered),
                    attempts: Vec::new(),
                })
                .collect(),
            call: Call::Track,
            event: None,
        }
    }

    /// Names its call type and event (a `track` without a name until then).
    pub fn named(mut self, call: Call, event: Option<&str>) -> EventTrail {
        self.call = call;
        self.event = event.map(Into::into);
        self
    }

    /// The destinations of `routes` that take its source but not this event (their `events`),
    /// and have no line of their own: routing stopped it there with reason `events`. Worked
    /// out when the path is read, against the config in force then.
    pub fn unsubscribed<'a>(&'a self, routes: &'a Routes) -> impl Iterator<Item = &'a Route> {
        routes.iter().filter(move |route| {
            route.takes_source(self.source_id)
                && !route.subscribed(self.call, self.event.as_deref())
                && self
                    .routes
                    .iter()
                    .all(|kept| kept.destination_id != route.destination_id)
        })
    }
}

/// A user's key as the trail keeps it: a hash, not a copy of every id. Two users share a hash
/// with odds of about one in 2^64 per pair, so a search may in theory show a stranger's event
/// (ids and times only, to an admin) and never misses one.
pub fn user_hash(user: &str) -> u64 {
    static HASHER: LazyLock<RandomState> = LazyLock::new(RandomState::new);
    HASHER.hash_one(user)
}

/// One attempt's result, as the scheduler reports it.
pub struct AttemptResult<'a> {
    pub message_id: &'a str,
    pub state: State,
    pub status: Option<u16>,
    /// Only failures carry one, so a delivered event allocates nothing here.
    pub error: Option<String>,
}

pub struct Trail {
    /// 0: recording is off.
    capacity: AtomicUsize,
    hasher: RandomState,
    ring: Mutex<Ring>,
    /// Attempts that did not deliver, for the live debugger ([`Trail::watch`]); sent only
    /// while someone watches, whether or not the ring records.
    outcomes: tokio::sync::broadcast::Sender<Arc<Outcome>>,
}

/// An attempt that did not deliver (filtered by the transform, retrying, dead), as the live
/// debugger shows it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub message_id: Box<str>,
    pub destination_id: i32,
    /// The event's source, when the ring still holds the event.
    pub source_id: Option<i32>,
    pub state: State,
    pub status: Option<u16>,
    pub error: Option<Box<str>>,
}

/// Outcomes a watcher may fall behind by before it misses some.
const OUTCOMES_BUFFER: usize = 1024;

#[derive(Default)]
struct Ring {
    /// Sequence number of `events[0]`.
    first: u64,
    events: VecDeque<EventTrail>,
    /// messageId hash → sequence number of its newest event (the hash saves a second copy of
    /// every id; a collision is caught by comparing the id).
    index: HashMap<u64, u64>,
}

impl Ring {
    fn find_mut(&mut self, hash: u64, message_id: &str) -> Option<&mut EventTrail> {
        let seq = *self.index.get(&hash)?;
        let at = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        self.events
            .get_mut(at)
            .filter(|event| &*event.message_id == message_id)
    }
}

impl Trail {
    pub fn new(capacity: usize) -> Trail {
        Trail {
            capacity: AtomicUsize::new(capacity),
            hasher: RandomState::new(),
            ring: Mutex::default(),
            outcomes: tokio::sync::broadcast::channel(OUTCOMES_BUFFER).0,
        }
    }

    /// Attempts that do not deliver, from now on.
    pub fn watch(&self) -> tokio::sync::broadcast::Receiver<Arc<Outcome>> {
        self.outcomes.subscribe()
    }

    /// Events kept at most; 0 when recording is off.
    pub fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Keeps at most `capacity` events from now on (the config's `[server] event_trail`, at
    /// start and at each reload): a smaller ring forgets its oldest events at once, and 0 turns
    /// recording off and frees the ring.
    pub fn set_capacity(&self, capacity: usize) {
        self.capacity.store(capacity, Ordering::Relaxed);
        let mut ring = self.ring();
        if capacity == 0 {
            let first = ring.first + ring.events.len() as u64;
            *ring = Ring {
                first,
                ..Ring::default()
            };
            return;
        }
        while ring.events.len() > capacity {
            self.pop_oldest(&mut ring);
        }
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        // The ring is only ever left consistent; a panic elsewhere does not poison its use.
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records events once they are stored (one lock for a whole request). A messageId already
    /// here from the same source is a repeat that dedup acknowledges without delivering: the
    /// first one's path is kept.
    pub fn accepted(&self, events: Vec<EventTrail>) {
        if self.capacity() == 0 {
            return;
        }
        let hashed: Vec<(u64, EventTrail)> = events
            .into_iter()
            .map(|event| (self.hasher.hash_one(&*event.message_id), event))
            .collect();
        let mut ring = self.ring();
        for (hash, event) in hashed {
            if ring
                .find_mut(hash, &event.message_id)
                .is_some_and(|known| known.source_id == event.source_id)
            {
                continue;
            }
            self.push(&mut ring, hash, event);
        }
    }

    fn push(&self, ring: &mut Ring, hash: u64, event: EventTrail) {
        while ring.events.len() >= self.capacity().max(1) {
            self.pop_oldest(ring);
        }
        let seq = ring.first + ring.events.len() as u64;
        ring.events.push_back(event);
        ring.index.insert(hash, seq);
    }

    fn pop_oldest(&self, ring: &mut Ring) {
        if let Some(old) = ring.events.pop_front() {
            let old_hash = self.hasher.hash_one(&*old.message_id);
            let first = ring.first;
            if ring.index.get(&old_hash) == Some(&first) {
                ring.index.remove(&old_hash);
            }
            ring.first += 1;
        }
    }

    /// Records the attempts of one delivery request to `destination_id`, all at `at`.
    pub fn attempted<'a>(
        &self,
        destination_id: i32,
        at: OffsetDateTime,
        results: impl IntoIterator<Item = AttemptResult<'a>>,
    ) {
        let watched = self.outcomes.receiver_count() > 0;
        if self.capacity() == 0 && !watched {
            return;
        }
        let hashed: Vec<(u64, AttemptResult<'a>)> = results
            .into_iter()
            .map(|result| (self.hasher.hash_one(result.message_id), result))
            .collect();
        let mut notes = Vec::new();
        let mut ring = self.ring();
        for (hash, result) in hashed {
            let error = result
                .error
                .as_deref()
                .map(|e| Box::<str>::from(cut(e, MAX_ERROR)));
            let found = ring.find_mut(hash, result.message_id);
            if watched && result.state != State::Delivered {
                notes.push(Outcome {
                    message_id: result.message_id.into(),
                    destination_id,
                    source_id: found.as_ref().map(|event| event.source_id),
                    state: result.state,
                    status: result.status,
                    error: error.clone(),
                });
            }
            let Some(event) = found else {
                continue;
            };
            let route = match event
                .routes
                .iter_mut()
                .position(|route| route.destination_id == destination_id)
            {
                Some(at) => &mut event.routes[at],
                // Routed by another process, or a replay: still worth showing.
                None => {
                    event.routes.push(RouteTrail {
                        destination_id,
                        state: State::Queued,
                        attempts: Vec::new(),
                    });
                    event.routes.last_mut().expect("just pushed")
                }
            };
            route.state = result.state;
            if route.attempts.len() == MAX_ATTEMPTS {
                route.attempts.remove(MAX_ATTEMPTS / 2);
            }
            // Most events are delivered at the first attempt: room for one, not the default four.
            route.attempts.reserve_exact(1);
            route.attempts.push(Attempt {
                at,
                status: result.status,
                error,
            });
        }
        drop(ring);
        for note in notes {
            // An error only means the last watcher left meanwhile.
            let _ = self.outcomes.send(Arc::new(note));
        }
    }

    /// The newest event with this messageId, if still in the ring.
    pub fn find(&self, message_id: &str) -> Option<EventTrail> {
        let hash = self.hasher.hash_one(message_id);
        self.ring().find_mut(hash, message_id).map(|e| e.clone())
    }

    /// The newest `limit` events of `user` (its userId, else anonymousId), newest first. A scan
    /// of the ring under its lock: ≈ 8 bytes compared an event, well under a millisecond for
    /// 50,000.
    pub fn by_user(&self, user: &str, limit: usize) -> Vec<EventTrail> {
        let wanted = user_hash(user);
        self.ring()
            .events
            .iter()
            .rev()
            .filter(|event| event.user == wanted)
            .take(limit)
            .cloned()
            .collect()
    }

    /// How many events are kept now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ring().events.len()
    }
}

fn cut(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    #[test]
    fn follows_an_event_through_its_attempts() {
        let trail = Trail::new(10);
        trail.accepted(vec![EventTrail::new(
            "m1",
            1,
            "u1",
            now(),
            [(7, None), (8, Some("where"))],
        )]);
        let failed = AttemptResult {
            message_id: "m1",
            state: State::Retrying,
            status: Some(500),
            error: Some("boom".into()),
        };
        trail.attempted(7, now(), [failed]);
        let delivered = AttemptResult {
            message_id: "m1",
            state: State::Delivered,
            status: None,
            error: None,
        };
        trail.attempted(7, now(), [delivered]);
        let event = trail.find("m1").unwrap();
        assert_eq!(event.routes[0].state, State::Delivered);
        assert_eq!(event.routes[0].attempts.len(), 2);
        assert_eq!(event.routes[0].attempts[0].status, Some(500));
        assert_eq!(event.routes[1].state, State::Filtered("where"));
    }

    #[test]
    fn forgets_the_oldest_beyond_capacity() {
        let trail = Trail::new(3);
        let event = |id: &str, source: i32, destination: i32| {
            EventTrail::new(id, source, "u", now(), [(destination, None)])
        };
        for i in 0..5 {
            trail.accepted(vec![event(&format!("m{i}"), 1, 1)]);
        }
        assert_eq!(trail.len(), 3);
        assert!(trail.find("m0").is_none());
        assert!(trail.find("m1").is_none());
        assert!(trail.find("m4").is_some());
        // A repeat from the same source keeps the first path.
        trail.accepted(vec![event("m4", 1, 9)]);
        assert_eq!(trail.find("m4").unwrap().routes[0].destination_id, 1);
        // The same id from another source points at the newest, and evicting the old one
        // keeps it.
        trail.accepted(vec![event("m2", 2, 9)]);
        trail.accepted(vec![event("x", 1, 1)]);
        assert_eq!(trail.find("m2").unwrap().routes[0].destination_id, 9);
    }

    #[test]
    fn a_smaller_capacity_forgets_the_oldest_and_zero_records_nothing() {
        let trail = Trail::new(4);
        let event = |id: &str| EventTrail::new(id, 1, "u", now(), [(1, None)]);
        for i in 0..4 {
            trail.accepted(vec![event(&format!("m{i}"))]);
        }
        trail.set_capacity(2);
        assert_eq!(trail.len(), 2);
        assert!(trail.find("m1").is_none());
        assert!(trail.find("m3").is_some());
        trail.set_capacity(0);
        assert_eq!(trail.len(), 0);
        trail.accepted(vec![event("m9")]);
        assert!(trail.find("m9").is_none(), "off: nothing is recorded");
        trail.set_capacity(3);
        trail.accepted(vec![event("m10")]);
        assert!(trail.find("m10").is_some());
    }

    #[test]
    fn finds_a_users_newest_events() {
        let trail = Trail::new(10);
        for (id, user) in [("a1", "ann"), ("b1", "bob"), ("a2", "ann"), ("a3", "ann")] {
            trail.accepted(vec![EventTrail::new(id, 1, user, now(), [(1, None)])]);
        }
        let ids = |events: Vec<EventTrail>| -> Vec<String> {
            events.iter().map(|e| e.message_id.to_string()).collect()
        };
        assert_eq!(ids(trail.by_user("ann", 10)), ["a3", "a2", "a1"]);
        assert_eq!(ids(trail.by_user("ann", 2)), ["a3", "a2"]);
        assert_eq!(ids(trail.by_user("bob", 10)), ["b1"]);
        assert!(trail.by_user("carl", 10).is_empty());
    }

    #[test]
    fn watchers_hear_of_attempts_that_did_not_deliver() {
        let trail = Trail::new(0);
        let mut watcher = trail.watch();
        let attempt = |id: &'static str, state: State| AttemptResult {
            message_id: id,
            state,
            status: None,
            error: (state != State::Delivered).then(|| "why".to_owned()),
        };
        trail.attempted(
            3,
            now(),
            [
                attempt("ok", State::Delivered),
                attempt("null", State::Filtered("transform")),
                attempt("boom", State::Dead),
            ],
        );
        let first = watcher.try_recv().unwrap();
        assert_eq!(
            (&*first.message_id, first.destination_id, first.state),
            ("null", 3, State::Filtered("transform"))
        );
        assert_eq!(
            first.source_id, None,
            "the ring is off: the source is unknown"
        );
        let second = watcher.try_recv().unwrap();
        assert_eq!(
            (&*second.message_id, second.error.as_deref()),
            ("boom", Some("why"))
        );
        assert!(
            watcher.try_recv().is_err(),
            "delivered attempts are not sent"
        );
    }

    #[test]
    fn cuts_errors_on_a_char_boundary() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("abc", 5), "abc");
    }
}
