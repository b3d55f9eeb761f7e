//! Golden signals in rolling windows: request count, failures, mTLS share and a latency sketch,
//! per direction, peer service and route (and per path, for `trellis top`), kept in fixed-length
//! time buckets.
//!
//! Every proxy keeps one [`RollingSignals`]; the control plane asks for the buckets of the last
//! minutes and merges the answers of many proxies. Merging is exact: counts add, and the latency
//! sketch is a histogram over fixed logarithmic buckets (DDSketch-style), so the sketch of merged
//! traffic is the sum of the sketches and its percentiles are within [`RELATIVE_ERROR`] of the
//! true values, whether one proxy or fifty recorded them.
//!
//! Memory is bounded: a bucket holds at most `max_series` series and `max_paths` paths; anything
//! beyond goes to one `other` entry, so the totals stay exact while the label set stays small.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;

/// Percentiles from a [`LatencySketch`] are within this share of the true value.
pub const RELATIVE_ERROR: f64 = 0.01;

/// The name of the entry that collects series or paths beyond the limits.
pub const OTHER: &str = "other";

/// Length of one bucket, in seconds.
pub const BUCKET_SECS: i64 = 10;

/// Paths longer than this are cut (a client may send anything).
const MAX_PATH_LEN: usize = 200;

/// Bins one sketch keeps at most: γ^256 ≈ 160, so latencies spread over up to 160× keep full
/// precision; beyond, the lowest bins fold together.
pub const MAX_SKETCH_BINS: usize = 256;

/// Per-path windows are kept for the newest this many buckets only (`trellis top` looks at the
/// last minute); series windows for the whole history.
pub const PATH_HISTORY_BUCKETS: usize = 6;

/// Latencies below this (in microseconds) fall in one "tiny" bucket.
const MIN_MICROS: f64 = 1.0;

fn gamma() -> f64 {
    (1.0 + RELATIVE_ERROR) / (1.0 - RELATIVE_ERROR)
}

/// A mergeable latency histogram over logarithmic buckets of ratio `gamma`: a value `v` (µs)
/// falls in bucket `ceil(log_gamma(v))`, and the bucket's representative value is within
/// [`RELATIVE_ERROR`] of every value in it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LatencySketch {
    /// Values under [`MIN_MICROS`].
    pub tiny: u64,
    /// Bucket index → count.
    pub buckets: BTreeMap<i32, u64>,
}

impl LatencySketch {
    pub fn record_micros(&mut self, micros: f64) {
        // NaN lands here too.
        if micros.is_nan() || micros < MIN_MICROS {
            self.tiny += 1;
            return;
        }
        let index = (micros.ln() / gamma().ln()).ceil() as i32;
        *self.buckets.entry(index).or_insert(0) += 1;
        self.collapse();
    }

    /// Keeps at most [`MAX_SKETCH_BINS`] bins by folding the lowest into the next one up
    /// (DDSketch's collapsing store): memory stays bounded, and only percentiles that fall in
    /// the folded low end lose precision (over a 160× spread of latencies).
    fn collapse(&mut self) {
        while self.buckets.len() > MAX_SKETCH_BINS {
            let Some((_, low)) = self.buckets.pop_first() else {
                return;
            };
            if let Some(mut next) = self.buckets.first_entry() {
                *next.get_mut() += low;
            }
        }
    }

    pub fn count(&self) -> u64 {
        self.tiny + self.buckets.values().sum::<u64>()
    }

    pub fn merge(&mut self, other: &LatencySketch) {
        self.tiny += other.tiny;
        for (i, c) in &other.buckets {
            *self.buckets.entry(*i).or_insert(0) += c;
        }
        self.collapse();
    }

    /// The `q` quantile (0..=1) in milliseconds; `None` when empty. Nearest-rank over the
    /// sorted values, so it is the value of a real sample up to the sketch's error.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((q.clamp(0.0, 1.0) * total as f64).ceil() as u64).max(1);
        let mut seen = self.tiny;
        if seen >= rank {
            return Some(0.0);
        }
        let g = gamma();
        for (index, count) in &self.buckets {
            seen += count;
            if seen >= rank {
                // Bucket i covers (g^(i-1), g^i]; 2·g^i/(g+1) is within the error of both ends.
                let micros = 2.0 * g.powi(*index) / (g + 1.0);
                return Some(micros / 1000.0);
            }
        }
        None
    }
}

/// Counts and latencies of some requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    pub requests: u64,
    /// 5xx and failed gRPC statuses, and requests the proxy could not complete.
    pub failures: u64,
    /// Requests carried over mTLS.
    pub tls: u64,
    pub latency: LatencySketch,
}

impl Window {
    pub fn record(&mut self, success: bool, tls: bool, latency_micros: f64) {
        self.requests += 1;
        self.failures += u64::from(!success);
        self.tls += u64::from(tls);
        self.latency.record_micros(latency_micros);
    }

    pub fn merge(&mut self, other: &Window) {
        self.requests += other.requests;
        self.failures += other.failures;
        self.tls += other.tls;
        self.latency.merge(&other.latency);
    }

    /// The JSON the API and CLI show for this window over `secs` seconds.
    pub fn summary(&self, secs: f64) -> Summary {
        let rate = |n: u64| (self.requests > 0).then(|| n as f64 / self.requests as f64);
        Summary {
            requests: self.requests,
            rps: if secs > 0.0 {
                self.requests as f64 / secs
            } else {
                0.0
            },
            success_rate: rate(self.requests - self.failures.min(self.requests)),
            tls_share: rate(self.tls),
            latency_ms: Percentiles {
                p50: self.latency.quantile_ms(0.50),
                p95: self.latency.quantile_ms(0.95),
                p99: self.latency.quantile_ms(0.99),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub rps: f64,
    pub success_rate: Option<f64>,
    pub tls_share: Option<f64>,
    pub latency_ms: Percentiles,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Percentiles {
    pub p50: Option<f64>,
    pub p95: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Inbound,
    Outbound,
}

/// One series: traffic in one direction with one peer service on one route.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct SeriesKey {
    pub direction: Direction,
    /// Inbound: the calling service; outbound: the destination service.
    pub peer: String,
    pub route: String,
}

/// One path (without its query), for the busiest-paths view.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct PathKey {
    pub direction: Direction,
    pub method: String,
    pub path: String,
}

/// A key's parts as borrowed strings. Keys hash through their parts, so a map of owned keys
/// can be searched with the request's own strings: recording a request allocates only when it
/// starts a new series or path.
trait KeyParts {
    fn parts(&self) -> (Direction, &str, &str);
}

/// A lookup key made of the request's strings.
type Probe<'a> = (Direction, &'a str, &'a str);

impl KeyParts for Probe<'_> {
    fn parts(&self) -> (Direction, &str, &str) {
        *self
    }
}

impl KeyParts for SeriesKey {
    fn parts(&self) -> (Direction, &str, &str) {
        (self.direction, &self.peer, &self.route)
    }
}

impl KeyParts for PathKey {
    fn parts(&self) -> (Direction, &str, &str) {
        (self.direction, &self.method, &self.path)
    }
}

impl std::hash::Hash for dyn KeyParts + '_ {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.parts().hash(h);
    }
}

impl PartialEq for dyn KeyParts + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn KeyParts + '_ {}

macro_rules! key_by_parts {
    ($key:ty) => {
        impl std::hash::Hash for $key {
            fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
                self.parts().hash(h);
            }
        }

        impl<'a> std::borrow::Borrow<dyn KeyParts + 'a> for $key {
            fn borrow(&self) -> &(dyn KeyParts + 'a) {
                self
            }
        }
    };
}

key_by_parts!(SeriesKey);
key_by_parts!(PathKey);

/// Counts one request under `probe` in `map`, or under the `other` key once `map` holds
/// `limit` keys.
fn record_in<K>(
    map: &mut FastMap<K, Window>,
    probe: Probe<'_>,
    limit: usize,
    key: impl Fn(Direction, &str, &str) -> K,
    o: &Observation<'_>,
) where
    K: std::hash::Hash + Eq + for<'a> std::borrow::Borrow<dyn KeyParts + 'a>,
{
    let window = if let Some(w) = map.get_mut(&probe as &dyn KeyParts) {
        w
    } else if map.len() < limit {
        map.entry(key(probe.0, probe.1, probe.2)).or_default()
    } else {
        map.entry(key(probe.0, OTHER, OTHER)).or_default()
    };
    window.record(o.success, o.tls, o.latency_micros);
}

/// A fast, unkeyed hash (the multiply-rotate of rustc's FxHash). Keys come from requests, but
/// a bucket holds at most a few hundred of them, so colliding keys cannot cost much; SipHash's
/// flooding resistance would cost more than it saves on every request.
#[derive(Default, Clone, Copy)]
pub struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x517c_c1b7_2722_0a95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(c);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word)).wrapping_mul(K);
        }
        for b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(K);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FastHasher>>;

/// The traffic of one time bucket.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Unix seconds at which the bucket starts (a multiple of [`BUCKET_SECS`]).
    pub start_unix: i64,
    pub series: FastMap<SeriesKey, Window>,
    pub paths: FastMap<PathKey, Window>,
}

impl Bucket {
    fn new(start_unix: i64) -> Self {
        Self {
            start_unix,
            ..Self::default()
        }
    }

    /// Adds `other`'s traffic (same bucket time from another proxy, or a previous merge).
    pub fn merge(&mut self, other: &Bucket) {
        for (k, w) in &other.series {
            self.series.entry(k.clone()).or_default().merge(w);
        }
        for (k, w) in &other.paths {
            self.paths.entry(k.clone()).or_default().merge(w);
        }
    }
}

/// Limits on what one bucket keeps (from MeshConfig `metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignalLimits {
    /// Distinct (direction, peer, route) series per bucket.
    pub max_series: usize,
    /// Distinct (direction, method, path) entries per bucket.
    pub max_paths: usize,
    /// How many buckets are kept (history length = this × [`BUCKET_SECS`]).
    pub buckets: usize,
}

impl Default for SignalLimits {
    fn default() -> Self {
        Self {
            max_series: 100,
            max_paths: 100,
            buckets: 30,
        }
    }
}

/// What one finished request contributes.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    pub direction: Direction,
    pub peer: &'a str,
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub success: bool,
    pub tls: bool,
    pub latency_micros: f64,
}

/// The rolling buckets of one proxy. Not synchronized: the proxy wraps it in a lock.
#[derive(Debug, Clone)]
pub struct RollingSignals {
    limits: SignalLimits,
    buckets: VecDeque<Bucket>,
}

impl RollingSignals {
    pub fn new(limits: SignalLimits) -> Self {
        Self {
            limits,
            buckets: VecDeque::new(),
        }
    }

    pub fn set_limits(&mut self, limits: SignalLimits) {
        self.limits = limits;
        while self.buckets.len() > limits.buckets.max(1) {
            self.buckets.pop_front();
        }
    }

    pub fn limits(&self) -> SignalLimits {
        self.limits
    }

    /// The bucket `now_unix` falls in; a clock step backwards lands in the newest bucket
    /// rather than rewriting history.
    fn current(&mut self, now_unix: i64) -> Option<&mut Bucket> {
        let start = now_unix - now_unix.rem_euclid(BUCKET_SECS);
        if self.buckets.back().is_none_or(|b| b.start_unix < start) {
            self.buckets.push_back(Bucket::new(start));
            while self.buckets.len() > self.limits.buckets.max(1) {
                self.buckets.pop_front();
            }
            let len = self.buckets.len();
            if len > PATH_HISTORY_BUCKETS
                && let Some(old) = self.buckets.get_mut(len - PATH_HISTORY_BUCKETS - 1)
            {
                old.paths = FastMap::default();
            }
        }
        self.buckets.back_mut()
    }

    pub fn record(&mut self, now_unix: i64, o: &Observation<'_>) {
        let limits = self.limits;
        let Some(bucket) = self.current(now_unix) else {
            return;
        };
        record_in(
            &mut bucket.series,
            (o.direction, o.peer, o.route),
            limits.max_series,
            |direction, peer, route| SeriesKey {
                direction,
                peer: peer.to_owned(),
                route: route.to_owned(),
            },
            o,
        );
        let mut path = o.path;
        if path.len() > MAX_PATH_LEN {
            let mut cut = MAX_PATH_LEN;
            while !path.is_char_boundary(cut) {
                cut -= 1;
            }
            path = &path[..cut];
        }
        record_in(
            &mut bucket.paths,
            (o.direction, o.method, path),
            limits.max_paths,
            |direction, method, path| PathKey {
                direction,
                method: method.to_owned(),
                path: path.to_owned(),
            },
            o,
        );
    }

    /// Copies of the buckets that start at or after `since_unix`, oldest first.
    pub fn since(&self, since_unix: i64) -> Vec<Bucket> {
        self.buckets
            .iter()
            .filter(|b| b.start_unix + BUCKET_SECS > since_unix)
            .cloned()
            .collect()
    }
}

/// Merges buckets from many proxies by bucket time.
pub fn merge_buckets<'a>(all: impl IntoIterator<Item = &'a Bucket>) -> BTreeMap<i64, Bucket> {
    let mut merged: BTreeMap<i64, Bucket> = BTreeMap::new();
    for b in all {
        merged
            .entry(b.start_unix)
            .or_insert_with(|| Bucket::new(b.start_unix))
            .merge(b);
    }
    merged
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs<'a>(peer: &'a str, path: &'a str, success: bool, micros: f64) -> Observation<'a> {
        Observation {
            direction: Direction::Inbound,
            peer,
            route: "default",
            method: "GET",
            path,
            success,
            tls: true,
            latency_micros: micros,
        }
    }

    #[test]
    fn quantiles_are_within_the_stated_error() {
        let mut s = LatencySketch::default();
        let values: Vec<f64> = (1..=10_000).map(|i| i as f64 * 7.3).collect();
        for v in &values {
            s.record_micros(*v);
        }
        for q in [0.5, 0.9, 0.95, 0.99, 0.999] {
            let exact = values[((q * values.len() as f64).ceil() as usize).max(1) - 1] / 1000.0;
            let got = s.quantile_ms(q).expect("non-empty");
            assert!(
                (got - exact).abs() <= exact * RELATIVE_ERROR,
                "q{q}: {got} vs {exact}"
            );
        }
        assert_eq!(s.count(), 10_000);
        assert_eq!(LatencySketch::default().quantile_ms(0.5), None);
    }

    #[test]
    fn merging_equals_recording_the_combined_traffic() {
        let mut parts = [
            RollingSignals::new(SignalLimits::default()),
            RollingSignals::new(SignalLimits::default()),
            RollingSignals::new(SignalLimits::default()),
        ];
        let mut combined = RollingSignals::new(SignalLimits::default());
        for i in 0..3000u32 {
            let now = 1_000 + i64::from(i / 100);
            let o = obs(
                ["a", "b"][(i % 2) as usize],
                ["/x", "/y", "/z"][(i % 3) as usize],
                i % 7 != 0,
                f64::from(i % 500) * 13.0 + 1.0,
            );
            parts[(i % 3) as usize].record(now, &o);
            combined.record(now, &o);
        }
        let all: Vec<Bucket> = parts.iter().flat_map(|p| p.since(0)).collect();
        let merged = merge_buckets(&all);
        let expected = merge_buckets(&combined.since(0));
        assert_eq!(merged, expected);
        let total: u64 = merged
            .values()
            .flat_map(|b| b.series.values())
            .map(|w| w.requests)
            .sum();
        assert_eq!(total, 3000);
    }

    #[test]
    fn a_sketch_keeps_bounded_bins_and_its_high_percentiles() {
        let mut s = LatencySketch::default();
        // 1 µs .. 10 s: far more than 256 bins' worth of spread.
        let values: Vec<f64> = (0..70_000)
            .map(|i| 1.0 + f64::from(i) * f64::from(i) / 490.0)
            .collect();
        for v in &values {
            s.record_micros(*v);
        }
        assert!(s.buckets.len() <= MAX_SKETCH_BINS);
        assert_eq!(s.count(), 70_000);
        for q in [0.9, 0.99] {
            let exact = values[((q * values.len() as f64).ceil() as usize) - 1] / 1000.0;
            let got = s.quantile_ms(q).expect("non-empty");
            assert!(
                (got - exact).abs() <= exact * RELATIVE_ERROR,
                "q{q}: {got} vs {exact}"
            );
        }
        let mut merged = s.clone();
        merged.merge(&s);
        assert!(merged.buckets.len() <= MAX_SKETCH_BINS);
        assert_eq!(merged.count(), 140_000);
    }

    #[test]
    fn buckets_roll_and_history_is_bounded() {
        let limits = SignalLimits {
            buckets: 3,
            ..SignalLimits::default()
        };
        let mut s = RollingSignals::new(limits);
        for t in (0..100).step_by(5) {
            s.record(t, &obs("a", "/", true, 10.0));
        }
        let kept = s.since(0);
        assert_eq!(kept.len(), 3);
        assert_eq!(kept[0].start_unix, 70);
        assert_eq!(s.since(85).len(), 2, "buckets 80 and 90 overlap t >= 85");

        let mut long = RollingSignals::new(SignalLimits::default());
        for t in (0..300).step_by(10) {
            long.record(t, &obs("a", "/", true, 10.0));
        }
        let kept = long.since(0);
        assert_eq!(kept.len(), 30);
        let with_paths = kept.iter().filter(|b| !b.paths.is_empty()).count();
        assert_eq!(
            with_paths, PATH_HISTORY_BUCKETS,
            "paths only for the last minute"
        );
        assert!(kept.iter().all(|b| b.series.len() == 1));
    }

    #[test]
    fn distinct_paths_beyond_the_limit_go_to_other_and_totals_stay_exact() {
        let limits = SignalLimits {
            max_series: 5,
            max_paths: 10,
            buckets: 2,
        };
        let mut s = RollingSignals::new(limits);
        for i in 0..100_000u32 {
            let path = format!("/item/{i}");
            let peer = format!("peer-{}", i % 50);
            s.record(42, &obs(&peer, &path, true, 100.0));
        }
        let b = &s.since(0)[0];
        assert_eq!(b.paths.len(), 11);
        assert_eq!(b.series.len(), 6);
        assert!(b.paths.keys().any(|k| k.path == OTHER));
        let total: u64 = b.paths.values().map(|w| w.requests).sum();
        assert_eq!(total, 100_000);
    }

    #[test]
    fn summary_counts_and_rates() {
        let mut w = Window::default();
        for i in 0..100 {
            w.record(i % 10 != 0, i % 2 == 0, 1000.0);
        }
        let s = w.summary(10.0);
        assert_eq!(s.requests, 100);
        assert_eq!(s.rps, 10.0);
        assert_eq!(s.success_rate, Some(0.9));
        assert_eq!(s.tls_share, Some(0.5));
        let p50 = s.latency_ms.p50.expect("p50");
        assert!((p50 - 1.0).abs() <= RELATIVE_ERROR);
        assert_eq!(Window::default().summary(10.0).success_rate, None);
    }
}
