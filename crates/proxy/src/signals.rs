//! What this proxy keeps for the control plane besides `/metrics`: golden signals in rolling
//! windows ([`GoldenSignals`]) and the inbound requests it denied ([`DenialLog`]), both read
//! over the control session on demand or at each heartbeat.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use trellis_core::signals::{Bucket, Observation, RollingSignals, SignalLimits};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data half-updated in a way
    // that matters more than losing observability; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Rolling golden-signal windows of this proxy. Cheap to clone.
#[derive(Clone)]
pub struct GoldenSignals(Arc<Mutex<RollingSignals>>);

impl Default for GoldenSignals {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(RollingSignals::new(
            SignalLimits::default(),
        ))))
    }
}

impl GoldenSignals {
    pub fn record(&self, observation: &Observation<'_>) {
        let now = now_unix();
        lock(&self.0).record(now, observation);
    }

    /// The buckets overlapping the last `window_secs` seconds.
    pub fn last(&self, window_secs: u32) -> Vec<Bucket> {
        let since = now_unix() - i64::from(window_secs);
        lock(&self.0).since(since)
    }

    /// New limits from MeshConfig.
    pub fn set_limits(&self, limits: SignalLimits) {
        let mut s = lock(&self.0);
        if s.limits() != limits {
            s.set_limits(limits);
        }
    }
}

/// One kind of denial: who was refused where, by which policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DenialKey {
    pub caller: String,
    pub route: String,
    pub policy: String,
    pub method: String,
    pub path: String,
}

/// Denied inbound requests since the last report, aggregated by [`DenialKey`]. Bounded: beyond
/// [`MAX_DENIAL_KEYS`] kinds, further denials are only counted in `overflow`.
#[derive(Clone, Default)]
pub struct DenialLog(Arc<Mutex<DenialState>>);

#[derive(Default)]
struct DenialState {
    counts: HashMap<DenialKey, (u64, i64)>,
    overflow: u64,
}

pub const MAX_DENIAL_KEYS: usize = 256;

impl DenialLog {
    pub fn record(&self, key: DenialKey) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut st = lock(&self.0);
        if let Some(entry) = st.counts.get_mut(&key) {
            entry.0 += 1;
            entry.1 = now_ms;
        } else if st.counts.len() < MAX_DENIAL_KEYS {
            st.counts.insert(key, (1, now_ms));
        } else {
            st.overflow += 1;
        }
    }

    /// Everything recorded since the last call: (kind, count, last time in Unix ms), and how
    /// many denials did not fit.
    pub fn take(&self) -> (Vec<(DenialKey, u64, i64)>, u64) {
        let mut st = lock(&self.0);
        let overflow = std::mem::take(&mut st.overflow);
        let entries = st
            .counts
            .drain()
            .map(|(k, (count, last))| (k, count, last))
            .collect();
        (entries, overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denials_aggregate_and_drain() {
        let log = DenialLog::default();
        let key = |path: &str| DenialKey {
            caller: "spiffe://t/ns/default/svc/a".into(),
            route: "default".into(),
            policy: "default/deny-a".into(),
            method: "GET".into(),
            path: path.into(),
        };
        for _ in 0..3 {
            log.record(key("/x"));
        }
        for i in 0..1000 {
            log.record(key(&format!("/{i}")));
        }
        let (entries, overflow) = log.take();
        assert_eq!(entries.len(), MAX_DENIAL_KEYS);
        let x = entries.iter().find(|(k, _, _)| k.path == "/x").expect("/x");
        assert_eq!(x.1, 3);
        let total: u64 = entries.iter().map(|e| e.1).sum::<u64>() + overflow;
        assert_eq!(total, 1003);
        assert!(log.take().0.is_empty());
    }
}
