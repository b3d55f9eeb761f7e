//! Endpoint choice. By default, power of two choices over peak-EWMA latency (the Finagle /
//! Linkerd balancer): each endpoint keeps a latency estimate that jumps up to any slower
//! observation (peak) and otherwise decays toward recent ones (EWMA); its cost is the estimate
//! times (requests in flight + 1). Two endpoints are drawn at random and the cheaper one wins,
//! which keeps a slow or overloaded endpoint mostly idle without the herding of "always the
//! best". Estimates also decay while an endpoint is not chosen, so a recovered one gets traffic
//! back. `round-robin`, `least-request` (P2C on requests in flight) and `random` are selectable
//! per destination.
//!
//! Only endpoints that [`outlier`](super::outlier) considers available are candidates, and with
//! locality failover on, the caller's zone is preferred (see [`choose`]).

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use trellis_core::resources::LoadBalancer;

use super::destinations::random_below;
use super::outlier::Health;

/// How fast old observations stop counting.
const DECAY: Duration = Duration::from_secs(10);
/// The estimate of an endpoint with no observations yet.
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Envoy's overprovisioning factor: the local zone keeps all traffic while at least 1/1.4
/// (~71%) of its endpoints are healthy, and spills the rest proportionally below that.
const OVERPROVISIONING: f64 = 1.4;

/// What the balancer knows about one endpoint; shared by every request to it and kept across
/// endpoint-set updates.
#[derive(Debug)]
pub struct EndpointLoad {
    rtt: Mutex<Rtt>,
    pending: AtomicU32,
    /// The first response from an endpoint usually includes connection setup (TCP, mTLS
    /// handshake); taken as a peak it would keep the endpoint idle for many seconds, so it
    /// is not counted.
    warmed: std::sync::atomic::AtomicBool,
    pub health: Health,
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
            warmed: std::sync::atomic::AtomicBool::new(false),
            health: Health::default(),
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
        estimate * (f64::from(self.pending()) + 1.0)
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::Relaxed)
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
            probe: false,
        }
    }
}

/// One request in flight to an endpoint.
#[derive(Debug)]
pub struct InFlight {
    load: Arc<EndpointLoad>,
    start: Instant,
    /// This request is the half-open probe of a previously ejected endpoint.
    pub(super) probe: bool,
}

impl InFlight {
    /// Response headers arrived: the time so far is a latency observation (except the
    /// endpoint's first, which paid for connection setup).
    pub fn observe_latency(&self) {
        if !self.load.warmed.swap(true, Ordering::Relaxed) {
            return;
        }
        let now = Instant::now();
        self.load
            .observe(now.saturating_duration_since(self.start), now);
    }

    pub fn load(&self) -> &Arc<EndpointLoad> {
        &self.load
    }

    /// A failure's latency counts too (a fast-failing endpoint must not look attractive), but
    /// at least at the current estimate so errors never lower it.
    pub fn observe_failure(&self) {
        let now = Instant::now();
        let current = self.load.rtt.lock().map(|r| r.ns).unwrap_or(0.0);
        let elapsed = now.saturating_duration_since(self.start);
        let penalty = Duration::from_nanos(current as u64).max(elapsed);
        self.load.observe(penalty, now);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
        if self.probe {
            // Ended without a verdict (cancelled): let another request probe.
            self.load.health.probe_abandoned();
        }
    }
}

/// Per-destination balancer state that outlives endpoint-set updates.
#[derive(Debug, Default)]
pub struct BalancerState {
    next: AtomicUsize,
}

/// Where an endpoint is and how much traffic it should take relative to the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointMeta {
    /// "" when unknown.
    pub zone: Arc<str>,
    /// Relative capacity (default 1): P2C and least-request divide cost by it, random and
    /// round-robin pick in proportion to it. 0: only used when every candidate is 0.
    pub weight: u32,
}

impl Default for EndpointMeta {
    fn default() -> Self {
        Self {
            zone: Arc::from(""),
            weight: 1,
        }
    }
}

/// The endpoints a choice may use.
pub struct Candidates<'a> {
    pub loads: &'a [Arc<EndpointLoad>],
    /// Zone and weight of each endpoint, index-aligned with `loads`.
    pub meta: &'a [EndpointMeta],
    /// The caller's zone ("" when unknown: no preference).
    pub local_zone: &'a str,
    pub locality_failover: bool,
}

/// Picks an endpoint index among the available ones; `None` when every endpoint is ejected or
/// unhealthy.
pub fn choose(
    algorithm: LoadBalancer,
    state: &BalancerState,
    c: &Candidates<'_>,
    now: Instant,
) -> Option<usize> {
    let n = c.loads.len();
    // The common case: every endpoint healthy, no zone preference, equal weights. Choose
    // among all of them without building candidate lists.
    let simple = c.loads.iter().all(|l| l.health.is_pristine())
        && (c.local_zone.is_empty() || !c.locality_failover)
        && c.meta.iter().all(|m| m.weight == 1);
    if simple && n > 0 {
        return Some(match algorithm {
            LoadBalancer::P2cEwma => p2c(n, |i| c.loads[i].cost(now)),
            LoadBalancer::LeastRequest => p2c(n, |i| f64::from(c.loads[i].pending())),
            LoadBalancer::RoundRobin => state.next.fetch_add(1, Ordering::Relaxed) % n,
            LoadBalancer::Random => random_below(n as u64) as usize,
        });
    }
    let available: Vec<usize> = (0..n)
        .filter(|&i| c.loads[i].health.available(now))
        .collect();
    if available.is_empty() {
        return None;
    }
    let pool = locality_pool(c, available);
    let weight = |i: usize| c.meta.get(i).map_or(1, |m| m.weight);
    // Weight 0 drains an endpoint, unless nothing else is left.
    let weighted: Vec<usize> = pool.iter().copied().filter(|&i| weight(i) > 0).collect();
    let pool = if weighted.is_empty() { pool } else { weighted };
    let w = |i: usize| f64::from(weight(i).max(1));
    let uniform = pool.iter().all(|&i| weight(i) == weight(pool[0]));
    let i = match algorithm {
        LoadBalancer::P2cEwma => pool[p2c(pool.len(), |k| c.loads[pool[k]].cost(now) / w(pool[k]))],
        LoadBalancer::LeastRequest => {
            pool[p2c(pool.len(), |k| {
                f64::from(c.loads[pool[k]].pending() + 1) / w(pool[k])
            })]
        }
        LoadBalancer::RoundRobin if uniform => {
            pool[state.next.fetch_add(1, Ordering::Relaxed) % pool.len()]
        }
        LoadBalancer::RoundRobin => {
            let total: u64 = pool.iter().map(|&i| u64::from(weight(i).max(1))).sum();
            let slot = state.next.fetch_add(1, Ordering::Relaxed) as u64 % total;
            by_cumulative_weight(&pool, slot, |i| u64::from(weight(i).max(1)))
        }
        LoadBalancer::Random if uniform => pool[random_below(pool.len() as u64) as usize],
        LoadBalancer::Random => {
            let total: u64 = pool.iter().map(|&i| u64::from(weight(i).max(1))).sum();
            by_cumulative_weight(&pool, random_below(total), |i| u64::from(weight(i).max(1)))
        }
    };
    Some(i)
}

/// The member of `pool` whose cumulative-weight interval contains `slot`.
fn by_cumulative_weight(pool: &[usize], mut slot: u64, weight: impl Fn(usize) -> u64) -> usize {
    for &i in pool {
        let w = weight(i);
        if slot < w {
            return i;
        }
        slot -= w;
    }
    pool[pool.len() - 1]
}

/// With failover on and a known local zone: the local zone's available endpoints with
/// probability min(1, 1.4 × its healthy share), else the other zones'.
fn locality_pool(c: &Candidates<'_>, available: Vec<usize>) -> Vec<usize> {
    if !c.locality_failover || c.local_zone.is_empty() {
        return available;
    }
    let local_total = c.meta.iter().filter(|m| &*m.zone == c.local_zone).count();
    if local_total == 0 {
        return available;
    }
    let (local, remote): (Vec<usize>, Vec<usize>) = available
        .into_iter()
        .partition(|&i| c.meta.get(i).is_some_and(|m| &*m.zone == c.local_zone));
    if remote.is_empty() {
        return local;
    }
    if local.is_empty() {
        return remote;
    }
    let share = (local.len() as f64 / local_total as f64 * OVERPROVISIONING).min(1.0);
    let draw = random_below(1_000_000) as f64 / 1_000_000.0;
    if draw < share { local } else { remote }
}

/// Power of two choices: the cheaper of two distinct random positions in `0..n`.
fn p2c(n: usize, cost: impl Fn(usize) -> f64) -> usize {
    if n <= 1 {
        return 0;
    }
    let a = random_below(n as u64) as usize;
    let b = (a + 1 + random_below(n as u64 - 1) as usize) % n;
    if cost(b) < cost(a) { b } else { a }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loads(n: usize) -> Vec<Arc<EndpointLoad>> {
        (0..n).map(|_| Arc::default()).collect()
    }

    fn pick(alg: LoadBalancer, state: &BalancerState, loads: &[Arc<EndpointLoad>]) -> usize {
        let meta: Vec<EndpointMeta> = loads.iter().map(|_| EndpointMeta::default()).collect();
        choose(
            alg,
            state,
            &Candidates {
                loads,
                meta: &meta,
                local_zone: "",
                locality_failover: true,
            },
            Instant::now(),
        )
        .expect("available")
    }

    #[test]
    fn a_slow_endpoint_gets_little_traffic_and_recovers_when_idle() {
        let loads = loads(3);
        let start = Instant::now();
        // Endpoint 2 answers in 100 ms, the others in 1 ms.
        for (i, l) in loads.iter().enumerate() {
            let ms = if i == 2 { 100 } else { 1 };
            l.observe(Duration::from_millis(ms), start);
        }
        let state = BalancerState::default();
        let mut picked = [0u32; 3];
        for _ in 0..3000 {
            picked[pick(LoadBalancer::P2cEwma, &state, &loads)] += 1;
        }
        // P2C: the slow one is always the costlier of any pair, so it gets nothing while its
        // estimate is high.
        assert_eq!(picked[2], 0, "{picked:?}");
        assert!(picked[0] > 1200 && picked[1] > 1200, "{picked:?}");
        // After a minute of not being chosen its estimate has decayed below the others'.
        let later = start + Duration::from_secs(60);
        assert!(loads[2].cost(later) < loads[0].cost(start));
    }

    #[test]
    fn in_flight_requests_make_an_endpoint_costlier() {
        let loads = loads(2);
        let now = Instant::now();
        let held: Vec<InFlight> = (0..4).map(|_| loads[0].start()).collect();
        assert!(loads[0].cost(now) > loads[1].cost(now) * 4.0);
        let state = BalancerState::default();
        for alg in [LoadBalancer::P2cEwma, LoadBalancer::LeastRequest] {
            assert!((0..100).all(|_| pick(alg, &state, &loads) == 1), "{alg:?}");
        }
        drop(held);
        assert_eq!(loads[0].pending(), 0);
    }

    #[test]
    fn round_robin_cycles_and_random_spreads() {
        let loads = loads(3);
        let state = BalancerState::default();
        let order: Vec<usize> = (0..6)
            .map(|_| pick(LoadBalancer::RoundRobin, &state, &loads))
            .collect();
        assert_eq!(order, vec![0, 1, 2, 0, 1, 2]);
        let mut seen = [0u32; 3];
        for _ in 0..3000 {
            seen[pick(LoadBalancer::Random, &state, &loads)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn weights_shift_traffic_in_proportion() {
        let loads = loads(2);
        let meta = [
            EndpointMeta {
                zone: Arc::from(""),
                weight: 3,
            },
            EndpointMeta::default(),
        ];
        let c = Candidates {
            loads: &loads,
            meta: &meta,
            local_zone: "",
            locality_failover: true,
        };
        let state = BalancerState::default();
        let now = Instant::now();
        for alg in [LoadBalancer::Random, LoadBalancer::RoundRobin] {
            let heavy = (0..4000)
                .filter(|_| choose(alg, &state, &c, now) == Some(0))
                .count() as f64
                / 4000.0;
            assert!((0.72..0.78).contains(&heavy), "{alg:?}: {heavy}");
        }
        // Under P2C a weight-3 endpoint stays the cheaper one until it has 3× the requests.
        let held: Vec<InFlight> = (0..1).map(|_| loads[0].start()).collect();
        assert_eq!(choose(LoadBalancer::LeastRequest, &state, &c, now), Some(0));
        drop(held);
        // Weight 0 drains an endpoint.
        let drained = [
            EndpointMeta::default(),
            EndpointMeta {
                zone: Arc::from(""),
                weight: 0,
            },
        ];
        let c = Candidates {
            meta: &drained,
            ..c
        };
        assert!((0..200).all(|_| choose(LoadBalancer::Random, &state, &c, now) == Some(0)));
    }

    #[test]
    fn the_first_response_does_not_set_a_peak() {
        let l: Arc<EndpointLoad> = Arc::default();
        let now = Instant::now();
        let before = l.cost(now);
        let first = l.start();
        std::thread::sleep(Duration::from_millis(20));
        first.observe_latency();
        drop(first);
        assert!(
            l.cost(Instant::now()) <= before,
            "connection setup is not a peak"
        );
        let second = l.start();
        std::thread::sleep(Duration::from_millis(20));
        second.observe_latency();
        drop(second);
        assert!(l.cost(Instant::now()) > 10e6, "later responses count");
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

    #[test]
    fn local_zone_is_preferred_until_it_runs_low() {
        let loads = loads(4);
        let meta: Vec<EndpointMeta> = ["a", "a", "a", "b"]
            .iter()
            .map(|z| EndpointMeta {
                zone: Arc::from(*z),
                weight: 1,
            })
            .collect();
        let state = BalancerState::default();
        let c = Candidates {
            loads: &loads,
            meta: &meta,
            local_zone: "a",
            locality_failover: true,
        };
        let now = Instant::now();
        let remote = |c: &Candidates<'_>| {
            (0..2000)
                .filter(|_| choose(LoadBalancer::Random, &state, c, now) == Some(3))
                .count()
        };
        assert_eq!(remote(&c), 0, "all local while the zone is healthy");
        // Two of three local endpoints ejected: local share 1/3 × 1.4 ≈ 47%.
        let policy = trellis_core::policy::OutlierDetection {
            consecutive_failures: 1,
            max_ejected_percent: 100,
            ..Default::default()
        };
        for i in [0, 1] {
            loads[i].health.eject_for_test(&policy, now);
        }
        let spilled = remote(&c) as f64 / 2000.0;
        assert!((0.45..0.61).contains(&spilled), "{spilled}");
        let off = Candidates {
            locality_failover: false,
            ..c
        };
        assert!(remote(&off) > 600, "without failover zones are ignored");
    }
}
