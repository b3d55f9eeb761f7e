//! Access log sink: one JSON line per HTTP request or TCP connection.
//!
//! Lines are formatted on the data path but written by a dedicated thread through a bounded
//! channel, so a slow disk or a blocked stdout never stalls traffic; if the channel is full the
//! line is dropped and counted (`dropped` in the final log message) rather than waiting.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
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
}

/// Handle to the access log. Cheap to clone; a no-op when off.
#[derive(Clone, Default)]
pub struct AccessLog {
    tx: Option<SyncSender<String>>,
    dropped: Arc<AtomicU64>,
}

const QUEUE: usize = 8192;

impl AccessLog {
    /// Opens the target and starts the writer thread.
    pub fn start(target: &AccessLogTarget) -> std::io::Result<Self> {
        let mut out: Box<dyn Write + Send> = match target {
            AccessLogTarget::Off => return Ok(Self::default()),
            AccessLogTarget::Stdout => Box::new(std::io::stdout()),
            AccessLogTarget::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
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
        Ok(Self {
            tx: Some(tx),
            dropped: Arc::default(),
        })
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn record(&self, entry: &Entry<'_>) {
        let Some(tx) = &self.tx else { return };
        let Ok(line) = serde_json::to_string(entry) else {
            return;
        };
        if let Err(TrySendError::Full(_)) = tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
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
