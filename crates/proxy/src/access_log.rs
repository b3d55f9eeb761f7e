//! Access log sink: one JSON line per HTTP request or TCP connection.
//!
//! Lines are formatted on the data path but written by a dedicated thread through a bounded
//! channel, so a slow disk or a blocked stdout never stalls traffic; if the channel is full the
//! line is dropped and counted (`dropped` in the final log message) rather than waiting.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use serde::Serialize;

/// Where access logs go (`--access-log PATH|stdout|off`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogTarget {
    Off,
    Stdout,
    File(std::path::PathBuf),
}

impl std::str::FromStr for AccessLogTarget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "off" | "" => Self::Off,
            "stdout" | "-" => Self::Stdout,
            path => Self::File(path.into()),
        })
    }
}

/// One access log record.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    pub time: String,
    /// `http` or `tcp`.
    pub kind: &'static str,
    pub direction: &'static str,
    pub src: String,
    pub src_service: &'a str,
    /// Inbound over mTLS: the caller's verified SPIFFE ID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    pub dst_service: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authority: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub duration_ms: f64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<&'a str>,
    /// The W3C trace id, when tracing is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

/// Handle to the access log. Cheap to clone; one atomic load per request while off.
///
/// `--access-log PATH|stdout` turns it on for good. Without the flag, MeshConfig switches it
/// at run time (`accessLog`, `accessLogServices`), writing to stdout.
#[derive(Clone, Default)]
pub struct AccessLog(Arc<Inner>);

#[derive(Default)]
struct Inner {
    /// Set by the flag: MeshConfig cannot switch it off.
    pinned: bool,
    enabled: AtomicBool,
    /// The writer thread's queue, started on first use.
    tx: OnceLock<Option<SyncSender<String>>>,
    dropped: AtomicU64,
}

const QUEUE: usize = 8192;

fn writer(mut out: Box<dyn Write + Send>) -> std::io::Result<SyncSender<String>> {
    let (tx, rx) = mpsc::sync_channel::<String>(QUEUE);
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Ok(line) = rx.recv() {
                buf.extend_from_slice(line.as_bytes());
                buf.push(b'\n');
                // Batch whatever else is queued, then write once.
                while let Ok(line) = rx.try_recv() {
                    buf.extend_from_slice(line.as_bytes());
                    buf.push(b'\n');
                }
                if out.write_all(&buf).and_then(|_| out.flush()).is_err() {
                    return;
                }
                buf.clear();
            }
        })?;
    Ok(tx)
}

impl AccessLog {
    /// Opens the target and starts the writer thread (`Off`: nothing until MeshConfig asks).
    pub fn start(target: &AccessLogTarget) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => return Ok(Self::default()),
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let tx = writer(out)?;
        Ok(Self(Arc::new(Inner {
            pinned: true,
            enabled: AtomicBool::new(true),
            tx: OnceLock::from(Some(tx)),
            dropped: AtomicU64::new(0),
        })))
    }

    /// MeshConfig's say for this proxy's service (ignored when the flag turned logging on).
    pub fn set_enabled_by_mesh(&self, on: bool) {
        if self.0.pinned || self.0.enabled.load(Ordering::Relaxed) == on {
            return;
        }
        if on {
            let started = self.0.tx.get_or_init(|| {
                writer(Box::new(std::io::stdout()))
                    .inspect_err(
                        |e| tracing::warn!(error = %e, "cannot start the access log writer"),
                    )
                    .ok()
            });
            if started.is_none() {
                return;
            }
        }
        tracing::info!(enabled = on, "access log switched by MeshConfig");
        self.0.enabled.store(on, Ordering::Relaxed);
    }

    pub fn is_enabled(&self) -> bool {
        self.0.enabled.load(Ordering::Relaxed)
    }

    pub fn record(&self, entry: &Entry<'_>) {
        let Some(Some(tx)) = self.0.tx.get() else {
            return;
        };
        let Ok(line) = serde_json::to_string(entry) else {
            return;
        };
        if let Err(TrySendError::Full(_)) = tx.try_send(line) {
            self.0.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
}

/// RFC 3339 UTC timestamp with milliseconds, e.g. `2026-11-22T03:04:05.678Z`.
pub fn rfc3339_now() -> String {
    trellis_core::time::rfc3339(SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_json_lines_to_a_file() {
        let dir = std::env::temp_dir().join(format!("trellis-al-{}", std::process::id()));
        let path = dir.with_extension("log");
        let log = AccessLog::start(&AccessLogTarget::File(path.clone())).expect("open");
        log.record(&Entry {
            time: rfc3339_now(),
            kind: "http",
            direction: "outbound",
            src: "127.0.0.1:1".into(),
            src_service: "web",
            client_id: None,
            dst_service: "payments",
            method: Some("GET"),
            authority: Some("payments"),
            path: Some("/x"),
            protocol: Some("HTTP/1.1"),
            status: Some(200),
            duration_ms: 1.5,
            bytes_in: 0,
            bytes_out: 5,
            error: None,
            trace_id: None,
        });
        let mut text = String::new();
        for _ in 0..200 {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            if !text.is_empty() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let v: serde_json::Value = serde_json::from_str(text.trim()).expect("one json line");
        assert_eq!(v["status"], 200);
        assert_eq!(v["dst_service"], "payments");
        let _ = std::fs::remove_file(path);
    }
}
