//! Live tap: subscribers receive the metadata of requests as they finish (never bodies),
//! filtered and rate-limited per subscriber. Publishing costs one atomic load while nobody
//! listens. A subscriber that goes away (client disconnected, control session ended) is
//! removed at the next publish or when its [`TapSubscription`] drops.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio::sync::mpsc;

/// One observed request.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TapRecord {
    pub time: String,
    pub unix_ms: i64,
    pub direction: &'static str,
    pub src: String,
    pub dst: String,
    pub route: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
    pub tls: bool,
}

/// Which requests a subscriber wants.
#[derive(Debug, Clone, Default)]
pub struct TapFilter {
    pub path_prefix: Option<String>,
    pub method: Option<String>,
}

impl TapFilter {
    pub fn matches(&self, method: &str, path: &str) -> bool {
        self.path_prefix
            .as_deref()
            .is_none_or(|p| path.starts_with(p))
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
    }
}

/// Per-subscriber ceiling, whatever is asked.
pub const MAX_EVENTS_PER_SECOND: u32 = 1000;
/// Queue per subscriber; a slow reader loses events rather than slowing traffic.
const QUEUE: usize = 256;

struct Subscriber {
    id: u64,
    filter: TapFilter,
    tx: mpsc::Sender<TapRecord>,
    max_per_second: u32,
    second_started: Instant,
    sent_this_second: u32,
}

#[derive(Default)]
struct TapInner {
    subscribers: Mutex<Vec<Subscriber>>,
    active: AtomicUsize,
    next_id: AtomicU64,
}

/// The tap hub of one proxy. Cheap to clone.
#[derive(Clone, Default)]
pub struct Tap(Arc<TapInner>);

/// Removes its subscriber when dropped.
pub struct TapSubscription {
    tap: Tap,
    id: u64,
}

impl Drop for TapSubscription {
    fn drop(&mut self) {
        self.tap.remove(self.id);
    }
}

impl Tap {
    /// Whether anyone listens (the data path checks this before gathering anything).
    pub fn is_active(&self) -> bool {
        self.0.active.load(Ordering::Relaxed) > 0
    }

    pub fn subscribers(&self) -> usize {
        self.0.active.load(Ordering::Relaxed)
    }

    pub fn subscribe(
        &self,
        filter: TapFilter,
        max_per_second: u32,
    ) -> (TapSubscription, mpsc::Receiver<TapRecord>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        let id = self.0.next_id.fetch_add(1, Ordering::Relaxed);
        let mut subs = self.0.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.push(Subscriber {
            id,
            filter,
            tx,
            max_per_second: max_per_second.clamp(1, MAX_EVENTS_PER_SECOND),
            second_started: Instant::now(),
            sent_this_second: 0,
        });
        self.0.active.store(subs.len(), Ordering::Relaxed);
        (
            TapSubscription {
                tap: self.clone(),
                id,
            },
            rx,
        )
    }

    fn remove(&self, id: u64) {
        let mut subs = self.0.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        subs.retain(|s| s.id != id);
        self.0.active.store(subs.len(), Ordering::Relaxed);
    }

    /// Hands `record` to every subscriber whose filter matches and whose rate allows.
    pub fn publish(&self, record: &TapRecord) {
        let mut subs = self.0.subscribers.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        subs.retain_mut(|s| {
            if s.tx.is_closed() {
                return false;
            }
            if !s.filter.matches(&record.method, &record.path) {
                return true;
            }
            if now.duration_since(s.second_started).as_secs() >= 1 {
                s.second_started = now;
                s.sent_this_second = 0;
            }
            if s.sent_this_second < s.max_per_second {
                s.sent_this_second += 1;
                // Full: this reader is behind; drop the event, never wait.
                let _ = s.tx.try_send(record.clone());
            }
            true
        });
        self.0.active.store(subs.len(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(path: &str) -> TapRecord {
        TapRecord {
            time: String::new(),
            unix_ms: 0,
            direction: "inbound",
            src: "a".into(),
            dst: "b".into(),
            route: "default".into(),
            method: "GET".into(),
            path: path.into(),
            status: 200,
            latency_ms: 1.0,
            trace_id: String::new(),
            tls: true,
        }
    }

    #[tokio::test]
    async fn filters_limits_and_forgets_departed_subscribers() {
        let tap = Tap::default();
        assert!(!tap.is_active());
        let (sub, mut rx) = tap.subscribe(
            TapFilter {
                path_prefix: Some("/api".into()),
                method: None,
            },
            5,
        );
        assert!(tap.is_active());
        tap.publish(&record("/other"));
        for _ in 0..10 {
            tap.publish(&record("/api/x"));
        }
        let mut got = 0;
        while let Ok(r) = rx.try_recv() {
            assert_eq!(r.path, "/api/x");
            got += 1;
        }
        assert_eq!(got, 5, "rate limit per second");
        drop(sub);
        assert!(!tap.is_active());

        let (_sub, rx) = tap.subscribe(TapFilter::default(), 10);
        drop(rx);
        tap.publish(&record("/"));
        assert!(!tap.is_active(), "a closed receiver is removed on publish");
    }
}
