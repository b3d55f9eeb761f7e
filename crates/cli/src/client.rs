//! Talking to the control plane's HTTP API: where it is (flag, env, context file written by
//! `trellis up`/`demo`, default) and small JSON request helpers with one-line errors.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

pub(crate) const DEFAULT_CONTROL_HTTP: &str = "http://127.0.0.1:7441";

/// Where `trellis up`/`demo` record the control plane they started.
pub(crate) fn context_path() -> PathBuf {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("trellis").join("context.json")
}

/// Records the control plane and its admin token (owner-readable only: the token is secret).
pub(crate) fn write_context(control_http: &str, admin_token: &str) -> std::io::Result<PathBuf> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = context_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)?;
    f.write_all(
        serde_json::json!({ "controlHttp": control_http, "adminToken": admin_token })
            .to_string()
            .as_bytes(),
    )?;
    Ok(path)
}

/// The admin token: `TRELLIS_ADMIN_TOKEN`, else the context file's (when it names the same
/// control plane), else `./trellis-data/admin-token` (a `trellis control` started here).
pub(crate) fn resolve_admin_token(base: &str) -> Option<String> {
    if let Ok(t) = std::env::var("TRELLIS_ADMIN_TOKEN")
        && !t.trim().is_empty()
    {
        return Some(t.trim().to_owned());
    }
    let from_context = std::fs::read_to_string(context_path())
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .filter(|v| {
            v.get("controlHttp")
                .and_then(|c| c.as_str())
                .map(|c| c.trim_end_matches('/'))
                == Some(base)
        })
        .and_then(|v| v.get("adminToken")?.as_str().map(str::to_owned));
    from_context.or_else(|| {
        std::fs::read_to_string("trellis-data/admin-token")
            .ok()
            .map(|t| t.trim().to_owned())
    })
}

/// `--control-http`, else `TRELLIS_CONTROL_HTTP` (clap reads both), else the context file,
/// else the default.
pub(crate) fn resolve_base(flag: Option<String>) -> String {
    flag.or_else(|| {
        let text = std::fs::read_to_string(context_path()).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        v.get("controlHttp")?.as_str().map(str::to_owned)
    })
    .unwrap_or_else(|| DEFAULT_CONTROL_HTTP.to_owned())
    .trim_end_matches('/')
    .to_owned()
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    #[error(
        "cannot reach the control plane at {base}: {reason} (start one with `trellis control` or `trellis up`, or set --control-http)"
    )]
    Unreachable { base: String, reason: String },
    #[error("{0}")]
    Other(String),
}

pub(crate) struct ApiClient {
    base: String,
    admin_token: Option<String>,
    http: Client<HttpConnector, Full<Bytes>>,
    actor: String,
}

impl ApiClient {
    pub(crate) fn new(base: String) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(3)));
        let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
        Self {
            admin_token: resolve_admin_token(&base),
            base,
            http: Client::builder(TokioExecutor::new()).build(connector),
            actor: format!("{user}@{}", host.trim()),
        }
    }

    /// Sends a request; returns the status and the JSON body.
    pub(crate) async fn call(
        &self,
        method: http::Method,
        path: &str,
        body: Option<String>,
    ) -> Result<(u16, serde_json::Value), ClientError> {
        let uri = format!("{}{path}", self.base);
        let mut req = http::Request::builder()
            .method(method)
            .uri(&uri)
            .header("x-trellis-actor", &self.actor);
        if let Some(token) = &self.admin_token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req
            .header("content-type", "application/yaml")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Other(format!("{uri}: {e}")))?;
        let rsp = tokio::time::timeout(Duration::from_secs(30), self.http.request(req))
            .await
            .map_err(|_| ClientError::Unreachable {
                base: self.base.clone(),
                reason: "timed out".into(),
            })?
            .map_err(|e| ClientError::Unreachable {
                base: self.base.clone(),
                reason: root_cause(&e),
            })?;
        let status = rsp.status().as_u16();
        let bytes = rsp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Other(e.to_string()))?
            .to_bytes();
        let json = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            serde_json::json!({ "errors": [{ "reason": String::from_utf8_lossy(&bytes).trim() }] })
        });
        Ok((status, json))
    }
}

impl ApiClient {
    /// Streams a newline-delimited response, calling `on_line` for each non-empty line until
    /// it returns false, the server ends the stream, or Ctrl-C.
    pub(crate) async fn stream_lines(
        &self,
        path: &str,
        mut on_line: impl FnMut(&str) -> bool,
    ) -> Result<(), ClientError> {
        use http_body_util::BodyExt;
        let uri = format!("{}{path}", self.base);
        let mut req = http::Request::builder().method(http::Method::GET).uri(&uri);
        if let Some(token) = &self.admin_token {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let req = req
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Other(format!("{uri}: {e}")))?;
        let rsp = self
            .http
            .request(req)
            .await
            .map_err(|e| ClientError::Unreachable {
                base: self.base.clone(),
                reason: root_cause(&e),
            })?;
        let status = rsp.status();
        let mut body = rsp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(ClientError::Other(format!(
                "{path}: {status} {}",
                String::from_utf8_lossy(&bytes).trim()
            )));
        }
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            let Some(frame) = frame else { return Ok(()) };
            let frame = frame.map_err(|e| ClientError::Other(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            pending.extend_from_slice(&data);
            while let Some(end) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=end).collect();
                let line = String::from_utf8_lossy(&line);
                let line = line.trim();
                if !line.is_empty() && !on_line(line) {
                    return Ok(());
                }
            }
            // A line longer than this is not ours.
            if pending.len() > 1 << 20 {
                pending.clear();
            }
        }
    }
}

/// The innermost cause ("Connection refused" rather than "client error (Connect)").
fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}
