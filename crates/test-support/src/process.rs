//! Runs the real `trellis-proxy` binary on loopback port 0 and learns the ports it bound from
//! its `listening` log line. The process is killed when the handle drops.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub struct ProxyProcess {
    child: Child,
    pub outbound: SocketAddr,
    pub inbound: SocketAddr,
    pub admin: SocketAddr,
    pub upstreams: BTreeMap<String, SocketAddr>,
    /// Everything the process wrote to stderr so far.
    pub stderr: Arc<Mutex<Vec<String>>>,
}

fn field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    let rest = rest.strip_prefix('"').unwrap_or(rest);
    let end = rest.find([' ', '"']).unwrap_or(rest.len());
    Some(rest[..end].to_owned())
}

impl ProxyProcess {
    /// Starts `bin` with `args`; listeners default to `127.0.0.1:0` unless `args` set them.
    pub async fn spawn(bin: &Path, args: &[&str]) -> Self {
        Self::spawn_with_env(bin, args, &[]).await
    }

    pub async fn spawn_with_env(bin: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(bin);
        for flag in ["--outbound", "--inbound", "--admin"] {
            if !args.contains(&flag) {
                cmd.args([flag, "127.0.0.1:0"]);
            }
        }
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn trellis-proxy");
        let stderr = child.stderr.take().expect("stderr");
        let stdout = child.stdout.take().expect("stdout");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                if line.contains("listening") {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        let line = tokio::time::timeout(Duration::from_secs(20), rx.recv())
            .await
            .ok()
            .flatten()
            .unwrap_or_else(|| {
                panic!(
                    "trellis-proxy did not report listening; output:\n{}",
                    lines.lock().unwrap().join("\n")
                )
            });
        let addr = |k| {
            field(&line, k)
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("no {k}= in {line}"))
        };
        let upstreams = field(&line, "upstreams")
            .unwrap_or_default()
            .split(',')
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_owned(), v.parse().ok()?))
            })
            .collect();
        Self {
            outbound: addr("outbound"),
            inbound: addr("inbound"),
            admin: addr("admin"),
            upstreams,
            child,
            stderr: lines,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Sends a signal by name (`TERM`, `KILL`, …) with the system `kill`.
    pub fn signal(&self, name: &str) {
        let status = std::process::Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .expect("process did not exit in time")
            .expect("wait")
    }

    pub fn output(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn upstream(&self, name: &str) -> SocketAddr {
        self.upstreams[name]
    }
}

/// A free loopback address: for processes that must come back on the same address after a
/// restart (everything else binds port 0).
pub fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
}

/// `trellis control` as a real process (so it can be killed with SIGKILL). Its log is kept
/// beside the data dir, in `<data>.log`.
pub struct ControlProcess {
    child: Child,
}

impl ControlProcess {
    pub async fn start(bin: &Path, grpc: SocketAddr, http: SocketAddr, data: &Path) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("log"))
            .expect("open the control plane's log");
        let child = Command::new(bin)
            .args(["control", "--grpc", &grpc.to_string()])
            .args(["--http", &http.to_string()])
            .arg("--data-dir")
            .arg(data)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn trellis control");
        crate::eventually(
            "control plane answers",
            Duration::from_secs(10),
            || async move { tokio::net::TcpStream::connect(http).await.ok().map(|_| ()) },
        )
        .await;
        Self { child }
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub async fn kill9(mut self) {
        self.child.start_kill().expect("kill");
        self.child.wait().await.expect("wait");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_of_the_listening_line() {
        let line = "2026 INFO trellis_proxy::app: listening service=web outbound=127.0.0.1:1 inbound=127.0.0.1:2 upstreams=a=127.0.0.1:3,b=127.0.0.1:4";
        assert_eq!(field(line, "outbound").as_deref(), Some("127.0.0.1:1"));
        assert_eq!(
            field(line, "upstreams").as_deref(),
            Some("a=127.0.0.1:3,b=127.0.0.1:4")
        );
    }
}
