//! Endpoint choice: power of two choices over peak-EWMA latency (the Finagle / Linkerd
//! balancer). Each endpoint keeps a latency estimate that jumps up to any slower observation
//! (peak) and otherwise decays toward recent ones (EWMA); its cost is the estimate times
//! (requests in flight + 1). Two endpoints are drawn at random and the cheaper one wins, which
//! keeps a slow or overloaded endpoint mostly idle without the herding of "always the best".
//! Estimates also decay while an endpoint is not chosen, so a recovered one gets traffic back.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::destinations::random_below;

/// How fast old observations stop counting.
const DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint with no observations yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);

#[derive(Debug)]
pub struct EndpointLoad {
    rtt: Mutex<Rtt>,
    pending: AtomicU32,
}

#[derive(Debug, Clone, Copy)]
struct Rtt {
    ns: f64,
    at: Instant,
}

impl Default for EndpointLoad {
    fn default() -> Self {
        Self {
            rtt: Mutex::new(Rtt {
                ns: DEFAULT_RTT.as_nanos() as f64,
                at: Instant::now(),
            }),
            pending: AtomicU32::new(0),
        }
    }
}

fn decay_weight(elapsed: Duration) -> f64 {
    (-elapsed.as_secs_f64() / DECAY.as_secs_f64()).exp()
}

impl EndpointLoad {
    /// The estimate decayed to `now`, times the requests in flight plus one.
    pub fn cost(&self, now: Instant) -> f64 {
        let rtt = *self.rtt.lock().unwrap_or_else(|p| p.into_inner());
        let w = decay_weight(now.saturating_duration_since(rtt.at));
        let estimate = rtt.ns * w;
        estimate * (f64::from(self.pending.load(Ordering::Relaxed)) + 1.0)
    }

    fn observe(&self, rtt: Duration, now: Instant) {
        let sample = rtt.as_nanos() as f64;
        let mut r = self.rtt.lock().unwrap_or_else(|p| p.into_inner());
        r.ns = if sample > r.ns {
            sample
        } else {
            let w = decay_weight(now.saturating_duration_since(r.at));
            r.ns * w + sample * (1.0 - w)
        };
        r.at = now;
    }

    /// Counts a request (or TCP connection) as in flight until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.pending.fetch_add(1, Ordering::Relaxed);
        InFlight {
            load: self.clone(),
            start: Instant::now(),
        }
    }
}

/// One request in flight to an endpoint.
#[derive(Debug)]
pub struct InFlight {
    load: Arc<EndpointLoad>,
    start: Instant,
}

impl InFlight {
    /// Response headers arrived: the time so far is a latency observation.
    pub fn complete(self) {
        let now = Instant::now();
        self.load
            .observe(now.saturating_duration_since(self.start), now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Power of two choices: the cheaper of two distinct random endpoints.
pub fn choose(loads: &[Arc<EndpointLoad>]) -> usize {
    let n = loads.len();
    if n <= 1 {
        return 0;
    }
    let a = random_below(n as u64) as usize;
    let b = (a + 1 + random_below(n as u64 - 1) as usize) % n;
    let now = Instant::now();
    if loads[b].cost(now) < loads[a].cost(now) {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_endpoint_gets_little_traffic_and_recovers_when_idle() {
        let loads: Vec<Arc<EndpointLoad>> = (0..3).map(|_| Arc::default()).collect();
        let start = Instant::now();
        // Endpoint 2 answers in 100 ms, the others in 1 ms.
        for (i, l) in loads.iter().enumerate() {
            let ms = if i == 2 { 100 } else { 1 };
            l.observe(Duration::from_millis(ms), start);
        }
        let mut picked = [0u32; 3];
        for _ in 0..3000 {
            picked[choose(&loads)] += 1;
        }
        // P2C: the slow one wins only when drawn against... never (it is always costlier),
        // so it gets nothing while its estimate is high.
        assert_eq!(picked[2], 0, "{picked:?}");
        assert!(picked[0] > 1200 && picked[1] > 1200, "{picked:?}");
        // After a minute of not being chosen its estimate has decayed below the others'.
        let later = start + Duration::from_secs(60);
        assert!(loads[2].cost(later) < loads[0].cost(start));
    }

    #[test]
    fn in_flight_requests_make_an_endpoint_costlier() {
        let (a, b): (Arc<EndpointLoad>, Arc<EndpointLoad>) = (Arc::default(), Arc::default());
        let now = Instant::now();
        let held: Vec<InFlight> = (0..4).map(|_| a.start()).collect();
        assert!(a.cost(now) > b.cost(now) * 4.0);
        let loads = [a.clone(), b.clone()];
        assert!((0..100).all(|_| choose(&loads) == 1));
        drop(held);
        assert_eq!(a.pending.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn peaks_are_taken_at_once_and_forgotten_gradually() {
        let l = EndpointLoad::default();
        let t0 = Instant::now();
        l.observe(Duration::from_millis(50), t0);
        assert!((l.cost(t0) - 50e6).abs() < 1.0);
        l.observe(Duration::from_millis(1), t0 + Duration::from_secs(10));
        let after = l.cost(t0 + Duration::from_secs(10));
        // One decay period: weight e^-1 on the old 50 ms.
        assert!(after > 15e6 && after < 25e6, "{after}");
    }
}
