//! Conversions between golden-signal buckets (`trellis_core::signals`) and their messages.

use trellis_core::signals::{Bucket, Direction, LatencySketch, PathKey, SeriesKey, Window};

use crate::{ApiError, err, pb};

/// A report may not carry more than this many sketch buckets per window (a sketch over
/// 1 µs..1000 s has about 1,040).
const MAX_SKETCH_BUCKETS: usize = 4096;

impl From<&Window> for pb::SignalWindow {
    fn from(w: &Window) -> Self {
        pb::SignalWindow {
            requests: w.requests,
            failures: w.failures,
            tls: w.tls,
            tiny: w.latency.tiny,
            indexes: w.latency.buckets.keys().copied().collect(),
            counts: w.latency.buckets.values().copied().collect(),
        }
    }
}

impl TryFrom<pb::SignalWindow> for Window {
    type Error = ApiError;
    fn try_from(w: pb::SignalWindow) -> Result<Self, ApiError> {
        if w.indexes.len() != w.counts.len() || w.indexes.len() > MAX_SKETCH_BUCKETS {
            return Err(err(
                "signal_window.indexes",
                "must pair with counts and stay bounded",
            ));
        }
        let mut latency = LatencySketch {
            tiny: w.tiny,
            ..LatencySketch::default()
        };
        for (i, c) in w.indexes.into_iter().zip(w.counts) {
            *latency.buckets.entry(i).or_insert(0) += c;
        }
        Ok(Window {
            requests: w.requests,
            failures: w.failures,
            tls: w.tls,
            latency,
        })
    }
}

fn direction(inbound: bool) -> Direction {
    if inbound {
        Direction::Inbound
    } else {
        Direction::Outbound
    }
}

impl From<&Bucket> for pb::SignalBucket {
    fn from(b: &Bucket) -> Self {
        pb::SignalBucket {
            start_unix: b.start_unix,
            series: b
                .series
                .iter()
                .map(|(k, w)| pb::SignalSeries {
                    inbound: k.direction == Direction::Inbound,
                    peer: k.peer.clone(),
                    route: k.route.clone(),
                    window: Some(w.into()),
                })
                .collect(),
            paths: b
                .paths
                .iter()
                .map(|(k, w)| pb::SignalPath {
                    inbound: k.direction == Direction::Inbound,
                    method: k.method.clone(),
                    path: k.path.clone(),
                    window: Some(w.into()),
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::SignalBucket> for Bucket {
    type Error = ApiError;
    fn try_from(b: pb::SignalBucket) -> Result<Self, ApiError> {
        let mut bucket = Bucket {
            start_unix: b.start_unix,
            ..Bucket::default()
        };
        for s in b.series {
            let window = Window::try_from(s.window.unwrap_or_default())?;
            bucket
                .series
                .entry(SeriesKey {
                    direction: direction(s.inbound),
                    peer: s.peer,
                    route: s.route,
                })
                .or_default()
                .merge(&window);
        }
        for p in b.paths {
            let window = Window::try_from(p.window.unwrap_or_default())?;
            bucket
                .paths
                .entry(PathKey {
                    direction: direction(p.inbound),
                    method: p.method,
                    path: p.path,
                })
                .or_default()
                .merge(&window);
        }
        Ok(bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_core::signals::{Observation, RollingSignals, SignalLimits};

    #[test]
    fn buckets_round_trip() {
        let mut s = RollingSignals::new(SignalLimits::default());
        for i in 0..500u32 {
            s.record(
                100 + i64::from(i / 50),
                &Observation {
                    direction: if i % 2 == 0 {
                        Direction::Inbound
                    } else {
                        Direction::Outbound
                    },
                    peer: "web",
                    route: "r",
                    method: "GET",
                    path: "/a",
                    success: i % 5 != 0,
                    tls: true,
                    latency_micros: f64::from(i) * 3.0,
                },
            );
        }
        for b in s.since(0) {
            let wire = pb::SignalBucket::from(&b);
            assert_eq!(Bucket::try_from(wire).expect("decodes"), b);
        }
    }

    #[test]
    fn mismatched_sketch_is_rejected() {
        let w = pb::SignalWindow {
            indexes: vec![1, 2],
            counts: vec![1],
            ..Default::default()
        };
        assert!(Window::try_from(w).is_err());
    }
}
