//! Live traffic first: replays slow down while live events wait longer for their commit.
//!
//! Live runs are claimed before replay runs, so live events are never queued behind a replay
//! in delivery. But on a machine a replay keeps busy, the replay's claims, requests and
//! outcomes share the CPU and the WAL with the live events' group commits, and the live events
//! wait longer for their `200`. So the governor reads the longest commit wait of this
//! process's ingest requests in each window of [`WINDOW`] (at 1,000 requests a second, about
//! their p99), and spaces the replay claims out while it is over [`MARGIN`] times what it was
//! with no replay running: the gap after each replay claim doubles in each window over it and
//! shrinks by a quarter in each window within it (the back-off TCP uses). The mean wait was
//! tried first: it stayed near a millisecond while the p99 tripled, and paced nothing. With no
//! live traffic, or none in this process (a `--role worker` process), replays run at full
//! speed; a rate-limited destination's replay is not paced (its limit bounds it).
//!
//! The wait without a replay is learnt while no replay runs, and again every [`PROBE_EVERY`]
//! of a running replay by holding replay claims for [`PROBE`], since live traffic changes over
//! a replay of hours.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::store::CommitTimes;

/// How often the live wait is read and the pace set.
const WINDOW: Duration = Duration::from_millis(100);
/// Live requests a window needs for its wait to count: fewer, and a replay has no live
/// traffic to make way for.
const MIN_SAMPLES: u64 = 10;
/// The live wait a replay may cause, as a multiple of the wait without it.
const MARGIN: f64 = 1.2;
/// ...plus this much, so that a wait of a millisecond or two is not paced on its noise.
const SLACK: Duration = Duration::from_micros(500);
/// The first gap between replay claims when live requests wait too long, and the longest.
const MIN_GAP: Duration = Duration::from_millis(5);
const MAX_GAP: Duration = Duration::from_millis(500);
/// How long after its last claim that found work a replay still counts as running.
const RUNNING_FOR: Duration = Duration::from_secs(2);
/// How often a running replay is held to learn the live wait without it, and for how long;
/// the wait is read in the last [`PROBE_READ`] of the hold, once the replay's requests in
/// flight at its start have finished.
const PROBE_EVERY: Duration = Duration::from_secs(10);
const PROBE: Duration = Duration::from_millis(400);
const PROBE_READ: Duration = Duration::from_millis(200);
/// Weight of a new window in the learnt wait; of a window read in a probe, which is rarer.
const LEARN: f64 = 0.25;
const PROBE_LEARN: f64 = 0.5;

/// When replay claims may start; read by the scheduler, set by [`govern`].
pub struct ReplayPace {
    origin: Instant,
    /// Microseconds after `origin` before which no replay claim starts.
    next_us: AtomicU64,
    /// Microseconds from a replay claim that found work to the next replay claim.
    gap_us: AtomicU64,
    /// When the last replay claim that found work came back, microseconds after `origin` (0:
    /// none yet).
    last_us: AtomicU64,
}

impl Default for ReplayPace {
    fn default() -> Self {
        ReplayPace {
            origin: Instant::now(),
            next_us: AtomicU64::new(0),
            gap_us: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
        }
    }
}

impl ReplayPace {
    fn now_us(&self) -> u64 {
        // At least 1: 0 in `last_us` means "no claim yet".
        (self.origin.elapsed().as_micros() as u64).max(1)
    }

    /// When replay claims may start again, if not now.
    pub fn held_until(&self) -> Option<Instant> {
        let next = self.next_us.load(Ordering::Acquire);
        (next > self.now_us()).then(|| self.origin + Duration::from_micros(next))
    }

    /// A replay claim found work: the next waits the current gap.
    pub fn claimed(&self) {
        let now = self.now_us();
        self.last_us.store(now, Ordering::Release);
        let gap = self.gap_us.load(Ordering::Acquire);
        self.next_us.fetch_max(now + gap, Ordering::AcqRel);
    }

    fn running(&self) -> bool {
        let last = self.last_us.load(Ordering::Acquire);
        last != 0 && self.now_us() - last < RUNNING_FOR.as_micros() as u64
    }

    fn apply(&self, step: Step) {
        self.gap_us
            .store(step.gap.as_micros() as u64, Ordering::Release);
        if let Some(hold) = step.hold {
            let until = self.now_us() + hold.as_micros() as u64;
            self.next_us.fetch_max(until, Ordering::AcqRel);
        }
    }
}

/// Sets `pace` from the longest live commit wait in `live`, every [`WINDOW`], until `stop`.
pub async fn govern(pace: Arc<ReplayPace>, live: Arc<CommitTimes>, stop: CancellationToken) {
    let mut governor = Governor::default();
    let mut tick = tokio::time::interval(WINDOW);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let (requests, longest) = live.take();
        let wait = (requests >= MIN_SAMPLES).then_some(longest);
        pace.apply(governor.window(wait, pace.running()));
    }
}

/// What one window decided.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Step {
    /// From a replay claim that found work to the next replay claim.
    gap: Duration,
    /// Hold replay claims this long from now (a probe).
    hold: Option<Duration>,
}

/// The pace's arithmetic, one window at a time.
#[derive(Debug, Default)]
struct Governor {
    /// The live wait without a replay, learnt.
    base: Option<Duration>,
    gap: Duration,
    /// Replaying since the last probe (or since the replay began) this long.
    since_probe: Duration,
    /// In a probe, this far.
    probing: Option<Duration>,
}

impl Governor {
    /// One window: `wait` is the longest commit wait of its live requests (`None` when it had
    /// too few), `replaying` whether a replay claim found work lately.
    fn window(&mut self, wait: Option<Duration>, replaying: bool) -> Step {
        if let Some(probed) = self.probing {
            let probed = probed + WINDOW;
            if probed > PROBE - PROBE_READ {
                if let Some(wait) = wait {
                    self.learn(wait, PROBE_LEARN);
                }
            }
            self.probing = (probed < PROBE).then_some(probed);
            return self.step(None);
        }
        let Some(wait) = wait else {
            // Nothing live to make way for.
            self.gap = Duration::ZERO;
            return self.step(None);
        };
        if !replaying {
            self.learn(wait, LEARN);
            self.since_probe = Duration::ZERO;
            self.gap = Duration::ZERO;
            return self.step(None);
        }
        self.since_probe += WINDOW;
        let Some(base) = self.base.filter(|_| self.since_probe < PROBE_EVERY) else {
            self.since_probe = Duration::ZERO;
            self.probing = Some(Duration::ZERO);
            return self.step(Some(PROBE));
        };
        if wait > base.mul_f64(MARGIN) + SLACK {
            self.gap = (self.gap * 2).clamp(MIN_GAP, MAX_GAP);
        } else {
            self.gap = self.gap.mul_f64(0.75);
            if self.gap < MIN_GAP / 2 {
                self.gap = Duration::ZERO;
            }
        }
        self.step(None)
    }

    fn learn(&mut self, wait: Duration, weight: f64) {
        self.base = Some(match self.base {
            Some(base) => base.mul_f64(1.0 - weight) + wait.mul_f64(weight),
            None => wait,
        });
    }

    fn step(&self, hold: Option<Duration>) -> Step {
        Step {
            gap: self.gap,
            hold,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A governor that learnt a live wait of 4 ms with no replay running.
    fn learnt() -> Governor {
        let mut governor = Governor::default();
        for _ in 0..10 {
            governor.window(Some(ms(4)), false);
        }
        governor
    }

    #[test]
    fn a_replay_with_no_live_traffic_runs_at_full_speed() {
        let mut governor = learnt();
        for _ in 0..50 {
            assert_eq!(governor.window(None, true).gap, Duration::ZERO);
        }
    }

    #[test]
    fn live_waits_over_the_margin_space_replay_claims_out_and_back() {
        let mut governor = learnt();
        // Within the margin: no gap.
        assert_eq!(governor.window(Some(ms(4)), true).gap, Duration::ZERO);
        // Over it: 5, 10, 20 ms ... up to the longest gap.
        let gaps: Vec<Duration> = (0..4)
            .map(|_| governor.window(Some(ms(12)), true).gap)
            .collect();
        assert_eq!(gaps, [ms(5), ms(10), ms(20), ms(40)]);
        for _ in 0..20 {
            governor.window(Some(ms(12)), true);
        }
        assert_eq!(governor.window(Some(ms(12)), true).gap, MAX_GAP);
        // Back within the margin: the gap shrinks to nothing.
        let mut last = MAX_GAP;
        for _ in 0..30 {
            let gap = governor.window(Some(ms(4)), true).gap;
            assert!(gap <= last, "{gap:?} after {last:?}");
            last = gap;
        }
        assert_eq!(last, Duration::ZERO);
    }

    #[test]
    fn a_replay_that_begins_before_any_live_wait_is_known_holds_to_learn_it() {
        let mut governor = Governor::default();
        let first = governor.window(Some(ms(30)), true);
        assert_eq!(first.hold, Some(PROBE));
        // Windows in the hold: the last ones read the wait without the replay.
        for _ in 0..4 {
            assert_eq!(governor.window(Some(ms(3)), true).hold, None);
        }
        assert_eq!(governor.base, Some(ms(3)));
        // Now the replay's 30 ms is over the margin.
        assert_eq!(governor.window(Some(ms(30)), true).gap, MIN_GAP);
    }

    #[test]
    fn a_long_replay_holds_now_and_then_to_relearn_the_live_wait() {
        let mut governor = learnt();
        // A probe every PROBE_EVERY of replaying, the probe itself not counted.
        let cycle = ((PROBE_EVERY + PROBE).as_millis() / WINDOW.as_millis()) as usize;
        let holds = (0..cycle * 3)
            .filter(|_| governor.window(Some(ms(4)), true).hold.is_some())
            .count();
        assert_eq!(holds, 3);
    }

    #[test]
    fn the_pace_holds_claims_for_the_gap_after_each() {
        let pace = ReplayPace::default();
        assert_eq!(pace.held_until(), None);
        pace.claimed();
        assert_eq!(pace.held_until(), None, "no gap: the next claim may start");
        pace.apply(Step {
            gap: ms(200),
            hold: None,
        });
        pace.claimed();
        let until = pace.held_until().expect("held after a claim");
        assert!(until > Instant::now() + ms(150));
        assert!(pace.running());
    }
}
