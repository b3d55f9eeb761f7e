//! Joining a test's control plane: the admin token from its data dir, join tokens created
//! through its HTTP API, and the files a proxy needs (`--token-file`, `--trust-bundle`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A control plane a test started: its addresses and data dir.
#[derive(Debug, Clone)]
pub struct ControlPlane {
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub data: PathBuf,
}

/// One HTTP/1.1 exchange; returns the status and the body.
pub async fn http_call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &str,
    admin_token: Option<&str>,
) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = admin_token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: control\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("write");
    s.write_all(body.as_bytes()).await.expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    // Chunked bodies: good enough for the small JSON answers tests read.
    (status, body)
}

impl ControlPlane {
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data.join("admin-token"))
            .expect("admin token")
            .trim()
            .to_owned()
    }

    pub fn bundle_path(&self) -> PathBuf {
        self.data.join("ca").join("bundle.pem")
    }

    /// Applies YAML with the admin token.
    pub async fn apply(&self, yaml: &str) -> (u16, String) {
        http_call(
            self.http,
            "POST",
            "/api/v1/apply",
            yaml,
            Some(&self.admin_token()),
        )
        .await
    }

    /// Creates a join token for `service` and writes it to a file.
    pub async fn token_file(&self, service: &str, extra: &str) -> PathBuf {
        let req = format!("{{\"service\":\"{service}\"{extra}}}");
        let (status, body) = http_call(
            self.http,
            "POST",
            "/api/v1/tokens",
            &req,
            Some(&self.admin_token()),
        )
        .await;
        assert_eq!(status, 200, "token: {body}");
        let token = body
            .split("\"token\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("token in answer")
            .to_owned();
        let path = self.data.with_extension(format!(
            "{service}-{}.token",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        std::fs::write(&path, token).expect("write token");
        path
    }

    /// `--control ... --token-file ... --trust-bundle ...` for a proxy of `service`.
    pub async fn join_args(&self, service: &str) -> Vec<String> {
        let token = self.token_file(service, "").await;
        vec![
            "--control".into(),
            self.grpc.to_string(),
            "--token-file".into(),
            path_str(&token),
            "--trust-bundle".into(),
            path_str(&self.bundle_path()),
        ]
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}
