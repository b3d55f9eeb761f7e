//! Passive health (outlier ejection, the per-endpoint circuit breaker) and the state active
//! health checks set.
//!
//! An endpoint that fails `consecutiveFailures` requests in a row (connection errors, 5xx,
//! per-try timeouts) is ejected for `baseEjectionTime × 2^(ejections so far)`, capped at
//! `maxEjectionTime`. When that time is up the circuit is half-open: exactly one request (the
//! probe) may go to it; success closes the circuit, failure ejects it again for longer. A
//! destination never has more than `maxEjectedPercent` of its endpoints ejected, so a
//! mesh-wide failure degrades into errors rather than an empty endpoint set.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use trellis_core::policy::OutlierDetection;

/// The outcome of one request to an endpoint, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Connection refused/reset, 5xx, or per-try timeout.
    Failure(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Circuit {
    #[default]
    Closed,
    Open {
        until: Instant,
    },
    /// Ejection over; `probing` while the one trial request is in flight.
    HalfOpen {
        probing: bool,
    },
}

#[derive(Debug, Default)]
struct State {
    circuit: Circuit,
    consecutive_failures: u32,
    /// Ejections so far (decremented by each successful probe): the backoff exponent.
    ejections: u32,
    last_reason: &'static str,
    /// Active health checks: failures in a row, and whether the threshold was reached.
    check_failures: u32,
    check_unhealthy: bool,
}

/// One endpoint's health, shared by every request to it.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<State>,
    /// Set while anything is off the happy path (failures counted, circuit not closed, failing
    /// checks), so a healthy endpoint is checked and updated without taking the lock.
    troubled: AtomicBool,
}

/// What `/config` and `trellis explain` show for an endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct HealthView {
    /// `healthy`, `ejected`, `half-open` or `unhealthy` (active checks).
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ejected_for_ms: Option<u64>,
    pub consecutive_failures: u32,
    pub ejections: u32,
}

/// What [`Health::record`] did, for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    None,
    Ejected {
        duration: Duration,
    },
    /// The threshold was reached but ejecting would exceed `maxEjectedPercent`.
    EjectionRefused,
    Recovered,
}

/// The lock on a [`Health`]'s state; refreshes the `troubled` flag when released.
struct Guard<'a> {
    state: std::sync::MutexGuard<'a, State>,
    troubled: &'a AtomicBool,
}

impl std::ops::Deref for Guard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.state
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        &mut self.state
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let s = &*self.state;
        let troubled = s.consecutive_failures > 0
            || s.circuit != Circuit::Closed
            || s.check_unhealthy
            || s.check_failures > 0;
        self.troubled.store(troubled, Ordering::Release);
    }
}

impl Health {
    fn lock(&self) -> Guard<'_> {
        Guard {
            state: self.state.lock().unwrap_or_else(|p| p.into_inner()),
            troubled: &self.troubled,
        }
    }

    /// Nothing is wrong with this endpoint (no lock taken).
    pub fn is_pristine(&self) -> bool {
        !self.troubled.load(Ordering::Acquire)
    }

    /// Whether a new request may use this endpoint now. An expired ejection turns half-open.
    pub fn available(&self, now: Instant) -> bool {
        if self.is_pristine() {
            return true;
        }
        let mut s = self.lock();
        if s.check_unhealthy {
            return false;
        }
        match s.circuit {
            Circuit::Closed => true,
            Circuit::Open { until } if now < until => false,
            Circuit::Open { .. } => {
                s.circuit = Circuit::HalfOpen { probing: false };
                true
            }
            Circuit::HalfOpen { probing } => !probing,
        }
    }

    /// Called when a request was sent here: returns true if it is the half-open probe.
    pub fn begin(&self) -> bool {
        if self.is_pristine() {
            return false;
        }
        let mut s = self.lock();
        match s.circuit {
            Circuit::HalfOpen { probing: false } => {
                s.circuit = Circuit::HalfOpen { probing: true };
                true
            }
            _ => false,
        }
    }

    pub(super) fn probe_abandoned(&self) {
        let mut s = self.lock();
        if s.circuit == (Circuit::HalfOpen { probing: true }) {
            s.circuit = Circuit::HalfOpen { probing: false };
        }
    }

    /// Whether the circuit is open (ejected, ejection not yet over).
    pub fn is_ejected(&self, now: Instant) -> bool {
        matches!(self.lock().circuit, Circuit::Open { until } if now < until)
    }

    /// Records an outcome. `may_eject` says whether one more ejection stays within
    /// `maxEjectedPercent` (the caller sees the whole destination).
    pub fn record(
        &self,
        outcome: Outcome,
        policy: &OutlierDetection,
        may_eject: bool,
        now: Instant,
    ) -> Transition {
        if outcome == Outcome::Success && self.is_pristine() {
            return Transition::None;
        }
        let mut s = self.lock();
        match outcome {
            Outcome::Success => {
                s.consecutive_failures = 0;
                if let Circuit::HalfOpen { .. } = s.circuit {
                    s.circuit = Circuit::Closed;
                    s.ejections = s.ejections.saturating_sub(1);
                    return Transition::Recovered;
                }
                Transition::None
            }
            Outcome::Failure(reason) => {
                s.consecutive_failures = s.consecutive_failures.saturating_add(1);
                s.last_reason = reason;
                let half_open = matches!(s.circuit, Circuit::HalfOpen { .. });
                let tripped = s.consecutive_failures >= policy.consecutive_failures;
                if matches!(s.circuit, Circuit::Open { .. }) || !(half_open || tripped) {
                    return Transition::None;
                }
                // A failed probe re-ejects regardless of the percentage: the endpoint was
                // already counted as ejected.
                if !half_open && !may_eject {
                    return Transition::EjectionRefused;
                }
                let duration = ejection_time(policy, s.ejections);
                s.circuit = Circuit::Open {
                    until: now + duration,
                };
                s.ejections = s.ejections.saturating_add(1);
                Transition::Ejected { duration }
            }
        }
    }

    /// An active health check result; returns whether the endpoint's checked state changed.
    pub fn record_check(&self, ok: bool, threshold: u32) -> bool {
        let mut s = self.lock();
        let before = s.check_unhealthy;
        if ok {
            s.check_failures = 0;
            s.check_unhealthy = false;
        } else {
            s.check_failures = s.check_failures.saturating_add(1);
            if s.check_failures >= threshold {
                s.check_unhealthy = true;
            }
        }
        before != s.check_unhealthy
    }

    /// Counts toward `maxEjectedPercent`: ejected or half-open (not yet proven healthy).
    pub fn counts_as_ejected(&self) -> bool {
        !self.is_pristine() && self.lock().circuit != Circuit::Closed
    }

    pub fn view(&self, now: Instant) -> HealthView {
        let s = self.lock();
        let (state, ejected_for_ms) = match s.circuit {
            _ if s.check_unhealthy => ("unhealthy", None),
            Circuit::Open { until } if now < until => (
                "ejected",
                Some(until.saturating_duration_since(now).as_millis() as u64),
            ),
            Circuit::Open { .. } | Circuit::HalfOpen { .. } => ("half-open", None),
            Circuit::Closed => ("healthy", None),
        };
        let reason = match state {
            "healthy" => None,
            "unhealthy" => Some(format!("{} failed health checks", s.check_failures)),
            _ => Some(format!(
                "{} consecutive failures ({})",
                s.consecutive_failures, s.last_reason
            )),
        };
        HealthView {
            state,
            reason,
            ejected_for_ms,
            consecutive_failures: s.consecutive_failures,
            ejections: s.ejections,
        }
    }

    #[cfg(test)]
    pub fn eject_for_test(&self, policy: &OutlierDetection, now: Instant) {
        self.record(Outcome::Failure("test"), policy, true, now);
    }
}

/// `base × 2^n`, capped at the maximum.
fn ejection_time(policy: &OutlierDetection, previous: u32) -> Duration {
    let factor = 1u32.checked_shl(previous.min(16)).unwrap_or(u32::MAX);
    policy
        .base_ejection
        .saturating_mul(factor)
        .min(policy.max_ejection.max(policy.base_ejection))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> OutlierDetection {
        OutlierDetection {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(5),
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn ejects_after_consecutive_failures_then_probes_once() {
        let h = Health::default();
        let p = policy();
        let t0 = Instant::now();
        let fail = Outcome::Failure("connect-failed");
        assert_eq!(h.record(fail, &p, true, t0), Transition::None);
        assert_eq!(h.record(Outcome::Success, &p, true, t0), Transition::None);
        for _ in 0..2 {
            assert_eq!(h.record(fail, &p, true, t0), Transition::None);
        }
        assert_eq!(
            h.record(fail, &p, true, t0),
            Transition::Ejected {
                duration: Duration::from_secs(1)
            }
        );
        assert!(!h.available(t0));
        assert_eq!(h.view(t0).state, "ejected");
        // Ejection over: one probe, and nobody else while it is in flight.
        let t1 = t0 + Duration::from_secs(1);
        assert!(h.available(t1));
        assert!(h.begin());
        assert!(!h.available(t1));
        // The probe fails: ejected again for twice as long.
        assert_eq!(
            h.record(fail, &p, false, t1),
            Transition::Ejected {
                duration: Duration::from_secs(2)
            }
        );
        let t2 = t1 + Duration::from_secs(2);
        assert!(h.available(t2) && h.begin());
        assert_eq!(
            h.record(Outcome::Success, &p, true, t2),
            Transition::Recovered
        );
        assert!(h.available(t2));
        assert_eq!(h.view(t2).state, "healthy");
    }

    #[test]
    fn ejection_respects_the_percentage_and_backoff_is_capped() {
        let h = Health::default();
        let p = policy();
        let t0 = Instant::now();
        for _ in 0..3 {
            h.record(Outcome::Failure("5xx"), &p, false, t0);
        }
        assert!(h.available(t0), "refused ejection keeps it in rotation");
        assert_eq!(ejection_time(&p, 10), Duration::from_secs(5));
        assert_eq!(ejection_time(&p, 40), Duration::from_secs(5));
    }

    #[test]
    fn abandoned_probe_lets_another_request_probe() {
        let h = Health::default();
        let p = OutlierDetection {
            consecutive_failures: 1,
            ..policy()
        };
        let t0 = Instant::now();
        h.record(Outcome::Failure("5xx"), &p, true, t0);
        let t1 = t0 + Duration::from_secs(1);
        assert!(h.available(t1) && h.begin());
        h.probe_abandoned();
        assert!(h.available(t1));
    }

    #[test]
    fn active_checks_take_an_endpoint_out_and_back() {
        let h = Health::default();
        let now = Instant::now();
        assert!(!h.record_check(false, 2));
        assert!(h.record_check(false, 2));
        assert!(!h.available(now));
        assert_eq!(h.view(now).state, "unhealthy");
        assert!(h.record_check(true, 2));
        assert!(h.available(now));
    }
}
