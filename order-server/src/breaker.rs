//! Circuit breaking: a pure state machine per node and per node × function.
//!
//! The conventions users know from Envoy's outlier detection and Hystrix:
//!
//! - **Closed**: work flows. Each attempt's outcome is recorded. `consecutive` failures
//!   in a row, or a failure rate of at least `failure_rate` over the last `window` with
//!   at least `min_volume` attempts, **eject** the target.
//! - **Open** (ejected): no new placements until `until`. The n-th ejection lasts
//!   `base_ejection × n`, capped at `max_ejection`, plus up to `jitter` of it (so nodes
//!   ejected together do not come back together).
//! - **Half-open**: after `until`, exactly one probe may be placed. Its success closes the
//!   breaker; its failure ejects again for longer.
//! - The ejection count decays: after `max_ejection` of closed, healthy running it
//!   starts again from zero.
//!
//! Whether an ejection may happen at all (never more than a share of a pool at once) is
//! the caller's decision: it passes `may_eject`. Time and jitter are inputs, so the
//! same inputs always give the same answers.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Thresholds of every breaker of an instance.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Failures in a row that eject.
    pub consecutive: u32,
    /// Failure share over `window` that ejects (with at least `min_volume` attempts).
    pub failure_rate: f64,
    pub window: Duration,
    pub min_volume: u32,
    /// First ejection; the n-th lasts n times this, capped at `max_ejection`.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// Extra random share of an ejection's length, 0..=1.
    pub jitter: f64,
    /// Most of a pool (nodes of one class on one instance) ejected at once.
    pub max_ejected_share: f64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive: 5,
            failure_rate: 0.5,
            window: Duration::from_secs(30),
            min_volume: 10,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            jitter: 0.1,
            max_ejected_share: 0.5,
        }
    }
}

impl BreakerConfig {
    /// How many of a pool of `size` may be ejected at once: never the whole pool, and
    /// at most `max_ejected_share` of it (so a pool of one is never ejected).
    pub fn max_ejected(&self, size: usize) -> usize {
        let share = self.max_ejected_share.clamp(0.0, 1.0);
        ((size as f64 * share).floor() as usize).min(size.saturating_sub(1))
    }

    fn ejection_length(&self, ejections: u32, jitter_unit: f64) -> Duration {
        let base = self
            .base_ejection
            .saturating_mul(ejections.max(1))
            .min(self.max_ejection);
        base + base.mul_f64(self.jitter.clamp(0.0, 1.0) * jitter_unit.clamp(0.0, 1.0))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open {
        until: Instant,
    },
    /// `probing`: the one probe attempt is out.
    HalfOpen {
        probing: bool,
    },
}

/// What a breaker lets through now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    Allow,
    /// Only as the probe: the caller must call [`Breaker::probe_started`] if it places.
    Probe,
    Deny,
}

/// What recording an outcome did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    None,
    /// Ejected (again) until the given time.
    Ejected {
        until: Instant,
        ejections: u32,
    },
    /// The probe succeeded: closed again.
    Restored,
    /// A threshold was crossed but the pool had no room for another ejection.
    Spared,
}

#[derive(Clone, Debug)]
pub struct Breaker {
    state: State,
    consecutive: u32,
    /// (when, failed) of recent attempts while closed.
    recent: VecDeque<(Instant, bool)>,
    ejections: u32,
    /// Since when the breaker has been closed (for the decay of `ejections`).
    closed_since: Instant,
}

impl Breaker {
    pub fn new(now: Instant) -> Self {
        Self {
            state: State::Closed,
            consecutive: 0,
            recent: VecDeque::new(),
            ejections: 0,
            closed_since: now,
        }
    }

    /// A breaker carried over from another attachment: `ejections` so far, and
    /// ejected until `until` (None: closed; a time already past: the probe is due).
    pub fn resumed(now: Instant, ejections: u32, until: Option<Instant>) -> Self {
        let mut b = Self::new(now);
        b.ejections = ejections;
        if let Some(until) = until {
            b.state = State::Open { until };
        }
        b
    }

    /// What [`Breaker::resumed`] takes to rebuild this one elsewhere: (ejections,
    /// ejected until); None for a breaker never ejected (or reset).
    pub fn carried(&self, now: Instant) -> Option<(u32, Option<Instant>)> {
        let until = match self.state {
            State::Closed => None,
            State::Open { until } => Some(until),
            State::HalfOpen { .. } => Some(now),
        };
        (self.ejections > 0 || until.is_some()).then_some((self.ejections, until))
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn ejections(&self) -> u32 {
        self.ejections
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive
    }

    /// Ejected or half-open: counts against the pool's ejection budget.
    pub fn is_ejected(&self) -> bool {
        self.state != State::Closed
    }

    pub fn admission(&self, now: Instant) -> Admission {
        match self.state {
            State::Closed => Admission::Allow,
            State::Open { until } if now < until => Admission::Deny,
            State::Open { .. } | State::HalfOpen { probing: false } => Admission::Probe,
            State::HalfOpen { probing: true } => Admission::Deny,
        }
    }

    /// The probe was placed: nothing else goes through until it answers.
    pub fn probe_started(&mut self) {
        self.state = State::HalfOpen { probing: true };
    }

    /// The probe went away without an outcome (never sent, cancelled): allow another.
    pub fn probe_abandoned(&mut self) {
        if self.state == (State::HalfOpen { probing: true }) {
            self.state = State::HalfOpen { probing: false };
        }
    }

    /// Records one attempt's outcome. `may_eject`: whether the pool has room for one
    /// more ejected member (asked only when a threshold is crossed: it may be costly).
    /// `jitter_unit` in 0..1 picks the jitter.
    pub fn record(
        &mut self,
        cfg: &BreakerConfig,
        now: Instant,
        failed: bool,
        may_eject: impl FnOnce() -> bool,
        jitter_unit: f64,
    ) -> Transition {
        match self.state {
            State::HalfOpen { .. } | State::Open { .. } => {
                // Only the probe's outcome gets here (nothing else is placed), or a
                // straggler from before the ejection, which must not decide anything.
                if self.state != (State::HalfOpen { probing: true }) {
                    return Transition::None;
                }
                if failed {
                    self.eject(cfg, now, jitter_unit)
                } else {
                    self.state = State::Closed;
                    self.consecutive = 0;
                    self.recent.clear();
                    self.closed_since = now;
                    Transition::Restored
                }
            }
            State::Closed => {
                while self
                    .recent
                    .front()
                    .is_some_and(|(t, _)| now.saturating_duration_since(*t) > cfg.window)
                {
                    self.recent.pop_front();
                }
                self.recent.push_back((now, failed));
                if !failed {
                    self.consecutive = 0;
                    return Transition::None;
                }
                self.consecutive += 1;
                let volume = self.recent.len() as u32;
                let failures = self.recent.iter().filter(|(_, f)| *f).count() as f64;
                let tripped = self.consecutive >= cfg.consecutive.max(1)
                    || (volume >= cfg.min_volume.max(1)
                        && failures / f64::from(volume) >= cfg.failure_rate);
                if !tripped {
                    Transition::None
                } else if !may_eject() {
                    Transition::Spared
                } else {
                    if now.saturating_duration_since(self.closed_since) > cfg.max_ejection {
                        self.ejections = 0;
                    }
                    self.eject(cfg, now, jitter_unit)
                }
            }
        }
    }

    fn eject(&mut self, cfg: &BreakerConfig, now: Instant, jitter_unit: f64) -> Transition {
        self.ejections = self.ejections.saturating_add(1);
        let until = now + cfg.ejection_length(self.ejections, jitter_unit);
        self.state = State::Open { until };
        self.consecutive = 0;
        self.recent.clear();
        Transition::Ejected {
            until,
            ejections: self.ejections,
        }
    }

    /// Operator restore: closed, with the ejection count forgotten.
    pub fn reset(&mut self, now: Instant) {
        *self = Self::new(now);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rand::{Rng, SeedableRng};

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            jitter: 0.0,
            ..BreakerConfig::default()
        }
    }

    #[test]
    fn consecutive_failures_eject_and_a_success_resets_the_run() {
        let c = cfg();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..4 {
            assert_eq!(b.record(&c, t0, true, || true, 0.0), Transition::None);
        }
        assert_eq!(b.record(&c, t0, false, || true, 0.0), Transition::None);
        for _ in 0..4 {
            assert_eq!(b.record(&c, t0, true, || true, 0.0), Transition::None);
        }
        let Transition::Ejected { until, ejections } = b.record(&c, t0, true, || true, 0.0) else {
            panic!("the fifth failure in a row ejects");
        };
        assert_eq!((until - t0, ejections), (Duration::from_secs(30), 1));
        assert_eq!(b.admission(t0 + Duration::from_secs(29)), Admission::Deny);
        assert_eq!(b.admission(until), Admission::Probe);
    }

    #[test]
    fn failure_rate_over_the_window_ejects_only_with_enough_volume() {
        let c = cfg();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        // Alternating: never 5 in a row, but 50% of 10 in the window.
        let mut last = Transition::None;
        for i in 0..10 {
            last = b.record(&c, t0, i % 2 == 1, || true, 0.0);
        }
        assert!(matches!(last, Transition::Ejected { .. }), "{last:?}");

        // The same pattern spread over more than the window never reaches the volume.
        let mut b = Breaker::new(t0);
        for i in 0..40u64 {
            let t = t0 + Duration::from_secs(i * 4);
            assert_eq!(b.record(&c, t, i % 2 == 1, || true, 0.0), Transition::None);
        }
    }

    #[test]
    fn half_open_admits_one_probe_whose_outcome_decides() {
        let c = cfg();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..5 {
            b.record(&c, t0, true, || true, 0.0);
        }
        let t1 = t0 + Duration::from_secs(30);
        assert_eq!(b.admission(t1), Admission::Probe);
        b.probe_started();
        assert_eq!(b.admission(t1), Admission::Deny, "one probe at a time");
        // The probe fails: ejected for 2 × 30 s.
        let Transition::Ejected { until, ejections } = b.record(&c, t1, true, || true, 0.0) else {
            panic!("a failed probe ejects again");
        };
        assert_eq!((until - t1, ejections), (Duration::from_secs(60), 2));
        let t2 = until;
        assert_eq!(b.admission(t2), Admission::Probe);
        b.probe_started();
        assert_eq!(b.record(&c, t2, false, || true, 0.0), Transition::Restored);
        assert_eq!(b.admission(t2), Admission::Allow);
        assert_eq!(b.ejections(), 2, "remembered until it decays");
    }

    #[test]
    fn abandoned_probes_free_the_slot_and_stragglers_decide_nothing() {
        let c = cfg();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..5 {
            b.record(&c, t0, true, || true, 0.0);
        }
        // A late result of work placed before the ejection changes nothing.
        assert_eq!(b.record(&c, t0, false, || true, 0.0), Transition::None);
        assert!(matches!(b.state(), State::Open { .. }));
        let t1 = t0 + Duration::from_secs(31);
        b.probe_started();
        b.probe_abandoned();
        assert_eq!(b.admission(t1), Admission::Probe);
    }

    #[test]
    fn the_pool_budget_spares_a_breaker() {
        let c = cfg();
        let t0 = Instant::now();
        let mut b = Breaker::new(t0);
        for _ in 0..4 {
            b.record(&c, t0, true, || false, 0.0);
        }
        assert_eq!(b.record(&c, t0, true, || false, 0.0), Transition::Spared);
        assert_eq!(b.admission(t0), Admission::Allow);
        assert_eq!(c.max_ejected(1), 0, "a pool of one is never ejected");
        assert_eq!(c.max_ejected(2), 1);
        assert_eq!(c.max_ejected(3), 1);
        assert_eq!(c.max_ejected(10), 5);
    }

    /// Properties over random outcome streams: an ejection never lasts less than
    /// base × n (capped) nor more than that plus the jitter share; a closed breaker never
    /// denies; an open one never admits before its time; at most one probe is out.
    #[test]
    fn properties_hold_on_random_outcome_streams() {
        let c = BreakerConfig::default();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for _ in 0..300 {
            let t0 = Instant::now();
            let mut b = Breaker::new(t0);
            let mut now = t0;
            let mut probes_out = 0;
            for _ in 0..400 {
                now += Duration::from_millis(rng.random_range(0..20_000));
                match b.admission(now) {
                    Admission::Deny => {
                        if let State::Open { until } = b.state() {
                            assert!(now < until);
                        }
                        continue;
                    }
                    Admission::Probe => {
                        assert_eq!(probes_out, 0);
                        b.probe_started();
                        probes_out = 1;
                    }
                    Admission::Allow => assert_eq!(b.state(), State::Closed),
                }
                let failed = rng.random_bool(0.6);
                let jitter = rng.random::<f64>();
                let before = b.ejections();
                match b.record(&c, now, failed, || true, jitter) {
                    Transition::Ejected { until, ejections } => {
                        assert!(ejections == before + 1 || ejections == 1);
                        let base = (c.base_ejection * ejections).min(c.max_ejection);
                        let len = until - now;
                        assert!(
                            len >= base && len <= base + base.mul_f64(c.jitter),
                            "{len:?}"
                        );
                        probes_out = 0;
                    }
                    Transition::Restored => {
                        assert!(!failed);
                        probes_out = 0;
                    }
                    Transition::None | Transition::Spared => {}
                }
            }
        }
    }
}
