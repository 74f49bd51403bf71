//! One batch, several requests: a vendor that takes one user per request (GA4), several
//! endpoints (Mixpanel) or a byte limit per request (Amplitude, Segment) delivers a batch as a
//! [`Plan`] of [`Part`]s, and every event still gets its own outcome. Kinds share this rather
//! than each writing the loop again.

use super::{DeliveryContext, HttpRequest, HttpResponse, Outcome, Verdict};

/// One vendor request carrying some events of a batch.
pub struct Part {
    /// What the request is, for classifying its answer (a kind with several endpoints tells
    /// them apart by it).
    pub label: &'static str,
    /// Indexes, in the batch, of the events it carries, in the order the request holds them.
    pub events: Vec<usize>,
    pub request: HttpRequest,
}

/// How one batch is delivered: the requests to send and the events that need none.
///
/// The engine hands a plugin one batch per call; a vendor that takes one user per request
/// (GA4), several endpoints (Mixpanel) or a byte limit per request needs more than one request.
/// A plan sends them one after another and gives every event its own outcome.
pub struct Plan {
    outcomes: Vec<Option<Outcome>>,
    parts: Vec<Part>,
}

impl Plan {
    /// A plan for a batch of `events` events.
    pub fn new(events: usize) -> Plan {
        Plan {
            outcomes: vec![None; events],
            parts: Vec::new(),
        }
    }

    /// The vendor has nothing for this event (a call type it does not support): it counts as
    /// delivered, and no request is made for it.
    pub fn skip(&mut self, index: usize) {
        self.set(index, Outcome::Delivered);
    }

    /// The event can never be delivered (it cannot be mapped): dead-letter it.
    pub fn fail(&mut self, index: usize, message: impl Into<String>) {
        self.set(index, Outcome::failed(message));
    }

    fn set(&mut self, index: usize, outcome: Outcome) {
        if let Some(slot) = self.outcomes.get_mut(index) {
            *slot = Some(outcome);
        }
    }

    pub fn send(&mut self, part: Part) {
        self.parts.push(part);
    }

    /// Sends the parts in order and combines the outcomes. `classify(label, answer, count)`
    /// judges one answer to a request of `count` events (a `PerEvent` verdict lists them in the
    /// request's order). Once the vendor throttles, the parts left are not sent: they are
    /// retried with the same pause.
    pub async fn deliver(
        self,
        ctx: &DeliveryContext<'_>,
        classify: impl Fn(&'static str, &HttpResponse, usize) -> Verdict,
    ) -> Verdict {
        let mut outcomes = self.outcomes;
        let mut throttled: Option<Outcome> = None;
        for Part {
            label,
            events,
            request,
        } in self.parts
        {
            let verdict = match &throttled {
                Some(Outcome::Retry {
                    status,
                    retry_after,
                    message,
                    ..
                }) => Verdict::All(Outcome::Retry {
                    status: *status,
                    retry_after: *retry_after,
                    throttled: true,
                    message: format!(
                        "not sent: another request of the batch was throttled: {message}"
                    ),
                }),
                _ => match ctx.http.send(request).await {
                    Ok(response) => classify(label, &response, events.len()),
                    Err(error) => Verdict::All(error.outcome()),
                },
            };
            for (index, outcome) in events.iter().zip(per_request(verdict, events.len(), label)) {
                if throttled.is_none()
                    && matches!(
                        outcome,
                        Outcome::Retry {
                            throttled: true,
                            ..
                        }
                    )
                {
                    throttled = Some(outcome.clone());
                }
                if let Some(slot) = outcomes.get_mut(*index) {
                    *slot = Some(outcome);
                }
            }
        }
        finish(outcomes)
    }

    /// Sends every part at once and combines the outcomes, for vendors that take one user per
    /// request (GA4): each request ends within the destination's timeout, so the whole batch
    /// does too, and one user's slow or hanging request costs the others neither their turn
    /// nor their result. What was delivered stays delivered; only the rest is retried.
    pub async fn deliver_concurrently(
        self,
        ctx: &DeliveryContext<'_>,
        classify: impl Fn(&'static str, &HttpResponse, usize) -> Verdict,
    ) -> Verdict {
        let mut outcomes = self.outcomes;
        let classify = &classify;
        let sent = futures::future::join_all(self.parts.into_iter().map(|part| async move {
            let verdict = match ctx.http.send(part.request).await {
                Ok(response) => classify(part.label, &response, part.events.len()),
                Err(error) => Verdict::All(error.outcome()),
            };
            (
                per_request(verdict, part.events.len(), part.label),
                part.events,
            )
        }))
        .await;
        for (verdicts, events) in sent {
            for (index, outcome) in events.into_iter().zip(verdicts) {
                if let Some(slot) = outcomes.get_mut(index) {
                    *slot = Some(outcome);
                }
            }
        }
        finish(outcomes)
    }
}

/// Every event's outcome; one no part carried is a bug of the kind, dead-lettered as such.
fn finish(outcomes: Vec<Option<Outcome>>) -> Verdict {
    Verdict::PerEvent(
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::failed("the kind made no request for it")))
            .collect(),
    )
}

/// A verdict on one request as one outcome per event of it.
fn per_request(verdict: Verdict, count: usize, label: &str) -> Vec<Outcome> {
    verdict.per_event(count, |got| {
        format!("{label}: {got} outcomes for a request of {count} events")
    })
}
