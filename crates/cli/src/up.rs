//! `trellis up -f mesh.yaml`: a whole mesh on one machine from one file.
//!
//! Starts the control plane (in this process), then for every service replica its app and its
//! own `trellis-proxy` on free loopback ports, wired through `HTTP_PROXY` (and optional upstream
//! ports); applies the file's resources; prints a table; and on Ctrl-C or SIGTERM stops every
//! process it started (SIGTERM, then SIGKILL after a grace period). Logs of every process go to
//! files under the run directory.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tokio::process::{Child, Command};

/// The mesh file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MeshFile {
    #[serde(default)]
    pub(crate) services: Vec<ServiceSpec>,
    /// Resources applied once the control plane is up (same format as `trellis apply`).
    #[serde(default)]
    pub(crate) resources: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ServiceSpec {
    pub(crate) name: String,
    /// The app's command line; `{port}` is replaced by its port (also in `$PORT`).
    pub(crate) command: Vec<String>,
    #[serde(default = "one")]
    pub(crate) replicas: u32,
    #[serde(default)]
    pub(crate) zone: Option<String>,
    #[serde(default)]
    pub(crate) env: BTreeMap<String, String>,
    #[serde(default)]
    pub(crate) labels: BTreeMap<String, String>,
    /// Services this app reaches through a local upstream port (`$UPSTREAM_<NAME>`), for
    /// protocols that cannot use HTTP_PROXY (gRPC, TCP).
    #[serde(default)]
    pub(crate) upstreams: Vec<String>,
}

fn one() -> u32 {
    1
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum UpError {
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
    #[error("{0}")]
    Failed(String),
}

impl MeshFile {
    pub(crate) fn load(path: &Path) -> Result<Self, UpError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| UpError::Invalid {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        let mesh: MeshFile = serde_saphyr::from_str(&text).map_err(|e| UpError::Invalid {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        for (i, s) in mesh.services.iter().enumerate() {
            let bad = |field: &str, reason: String| UpError::Invalid {
                file: file.clone(),
                reason: format!("services[{i}].{field}: {reason}"),
            };
            trellis_core::ServiceName::new(s.name.as_str())
                .map_err(|e| bad("name", format!("{:?} {e}", s.name)))?;
            if s.command.is_empty() {
                return Err(bad("command", "must not be empty".into()));
            }
            if s.replicas == 0 || s.replicas > 64 {
                return Err(bad("replicas", "must be 1-64".into()));
            }
            for u in &s.upstreams {
                trellis_core::ServiceName::new(u.as_str())
                    .map_err(|e| bad("upstreams", format!("{u:?} {e}")))?;
            }
        }
        Ok(mesh)
    }

    /// The resources as one apply document set.
    pub(crate) fn resources_json(&self) -> Option<String> {
        (!self.resources.is_empty())
            .then(|| serde_json::Value::Array(self.resources.clone()).to_string())
    }
}

/// One started process.
pub(crate) struct Managed {
    pub(crate) label: String,
    pub(crate) child: Child,
}

/// One started replica.
pub(crate) struct Replica {
    pub(crate) service: String,
    pub(crate) index: u32,
    pub(crate) app: SocketAddr,
    pub(crate) inbound: SocketAddr,
    pub(crate) outbound: SocketAddr,
    pub(crate) admin: SocketAddr,
}

/// A running local mesh.
pub(crate) struct Mesh {
    pub(crate) control: trellis_control::Running,
    pub(crate) replicas: Vec<Replica>,
    pub(crate) processes: Vec<Managed>,
    pub(crate) run_dir: PathBuf,
}

pub(crate) async fn free_port() -> Result<SocketAddr, UpError> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| UpError::Failed(format!("bind: {e}")))?;
    l.local_addr().map_err(|e| UpError::Failed(e.to_string()))
}

fn sibling_binary(name: &str) -> Result<PathBuf, UpError> {
    let me = std::env::current_exe().map_err(|e| UpError::Failed(e.to_string()))?;
    let p = me.with_file_name(name);
    if p.exists() {
        Ok(p)
    } else {
        Err(UpError::Failed(format!(
            "cannot find {name} next to {} (build with `cargo build --release`)",
            me.display()
        )))
    }
}

fn log_file(dir: &Path, name: &str) -> Result<std::fs::File, UpError> {
    std::fs::File::create(dir.join(name))
        .map_err(|e| UpError::Failed(format!("{}: {e}", dir.join(name).display())))
}

async fn wait_ready(admin: SocketAddr, what: &str, log: &Path) -> Result<(), UpError> {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(admin).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /ready HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = [0u8; 16];
            if let Ok(n) = s.read(&mut buf).await
                && buf[..n].starts_with(b"HTTP/1.1 200")
            {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(UpError::Failed(format!(
        "{what} did not become ready; see {}",
        log.display()
    )))
}

impl Mesh {
    /// Starts everything in `mesh`; on failure, stops what was started.
    pub(crate) async fn start(mesh: &MeshFile, run_dir: PathBuf) -> Result<Mesh, UpError> {
        std::fs::create_dir_all(&run_dir)
            .map_err(|e| UpError::Failed(format!("{}: {e}", run_dir.display())))?;
        let proxy_bin = sibling_binary("trellis-proxy")?;
        let control = trellis_control::start(trellis_control::ControlConfig::new(
            free_port().await?,
            free_port().await?,
            run_dir.join("control-data"),
        ))
        .await
        .map_err(|e| UpError::Failed(format!("control plane: {e}")))?;
        let mut this = Mesh {
            control,
            replicas: Vec::new(),
            processes: Vec::new(),
            run_dir: run_dir.clone(),
        };
        if let Some(resources) = mesh.resources_json() {
            let docs = trellis_core::resources::parse_documents(&resources).map_err(|errs| {
                UpError::Invalid {
                    file: "resources".into(),
                    reason: errs
                        .iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; "),
                }
            })?;
            this.control
                .store
                .apply(&docs, "trellis-up", false)
                .map_err(|e| UpError::Failed(e.to_string()))?;
        }
        for svc in &mesh.services {
            for index in 0..svc.replicas {
                if let Err(e) = this.start_replica_retrying(&proxy_bin, svc, index).await {
                    this.stop().await;
                    return Err(e);
                }
            }
        }
        Ok(this)
    }

    /// Ports are picked free and handed to the processes, so another program can take one in
    /// between; a proxy that could not bind is started again on new ports (twice at most).
    async fn start_replica_retrying(
        &mut self,
        proxy_bin: &Path,
        svc: &ServiceSpec,
        index: u32,
    ) -> Result<(), UpError> {
        let mut attempt = 0;
        loop {
            let started = self.processes.len();
            let result = self.start_replica(proxy_bin, svc, index).await;
            let proxy_log = self.run_dir.join(format!("{}-{index}.proxy.log", svc.name));
            let port_taken = result.is_err()
                && std::fs::read_to_string(&proxy_log)
                    .is_ok_and(|log| log.contains("Address already in use"));
            if !port_taken || attempt == 2 {
                return result;
            }
            attempt += 1;
            // Dropping them kills them (`kill_on_drop`).
            self.processes.truncate(started);
            let _ = std::fs::rename(
                &proxy_log,
                proxy_log.with_extension(format!("log.{attempt}")),
            );
        }
    }

    async fn start_replica(
        &mut self,
        proxy_bin: &Path,
        svc: &ServiceSpec,
        index: u32,
    ) -> Result<(), UpError> {
        let (app, inbound, outbound, admin) = (
            free_port().await?,
            free_port().await?,
            free_port().await?,
            free_port().await?,
        );
        let id = format!("{}-{index}", svc.name);
        let proxy_log = self.run_dir.join(format!("{id}.proxy.log"));
        // One single-use join token per proxy, readable by this user only.
        let token_file = self.run_dir.join(format!("{id}.token"));
        let service = trellis_core::ServiceName::new(svc.name.as_str())
            .map_err(|e| UpError::Failed(format!("service {}: {e}", svc.name)))?;
        let (token, _) = self
            .control
            .tokens
            .create(
                &service,
                &trellis_core::Namespace::default(),
                Duration::from_secs(3600),
                Some(1),
            )
            .map_err(|e| UpError::Failed(format!("join token: {e}")))?;
        write_private(&token_file, &token)?;
        let bundle_file = self.run_dir.join("trust-bundle.pem");
        std::fs::write(&bundle_file, self.control.ca.bundle_pem())
            .map_err(|e| UpError::Failed(format!("{}: {e}", bundle_file.display())))?;
        let mut proxy = Command::new(proxy_bin);
        proxy
            .args(["--service", &svc.name, "--instance", &id])
            .args(["--control", &self.control.grpc_addr.to_string()])
            .arg("--token-file")
            .arg(&token_file)
            .arg("--trust-bundle")
            .arg(&bundle_file)
            .args(["--app", &app.to_string(), "--inbound", &inbound.to_string()])
            .args([
                "--outbound",
                &outbound.to_string(),
                "--admin",
                &admin.to_string(),
            ])
            .args([
                "--access-log",
                self.run_dir
                    .join(format!("{id}.access.log"))
                    .to_str()
                    .unwrap_or("off"),
            ]);
        if let Some(zone) = &svc.zone {
            proxy.args(["--zone", zone]);
        }
        for (k, v) in &svc.labels {
            proxy.args(["--label", &format!("{k}={v}")]);
        }
        let mut upstream_env = Vec::new();
        for u in &svc.upstreams {
            let port = free_port().await?;
            proxy.args(["--upstream", &format!("{u}={port}")]);
            upstream_env.push((
                format!("UPSTREAM_{}", u.to_uppercase().replace('-', "_")),
                port.to_string(),
            ));
        }
        let child = proxy
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file(&self.run_dir, &format!("{id}.proxy.log"))?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| UpError::Failed(format!("{}: {e}", proxy_bin.display())))?;
        self.processes.push(Managed {
            label: format!("{id} proxy"),
            child,
        });

        let port = app.port().to_string();
        let argv: Vec<String> = svc
            .command
            .iter()
            .map(|a| a.replace("{port}", &port))
            .collect();
        let program = if argv[0] == "trellis" {
            std::env::current_exe().map_err(|e| UpError::Failed(e.to_string()))?
        } else {
            PathBuf::from(&argv[0])
        };
        let proxy_url = format!("http://{outbound}");
        let app_log = self.run_dir.join(format!("{id}.app.log"));
        let child = Command::new(&program)
            .args(&argv[1..])
            .env("PORT", &port)
            .env("SERVICE_NAME", &svc.name)
            .env("INSTANCE_ID", &id)
            .env("TRELLIS_RUN_DIR", &self.run_dir)
            .env("HTTP_PROXY", &proxy_url)
            .env("http_proxy", &proxy_url)
            .env("NO_PROXY", "localhost,127.0.0.1")
            .envs(upstream_env)
            .envs(&svc.env)
            .stdin(Stdio::null())
            .stdout(log_file(&self.run_dir, &format!("{id}.app.log"))?)
            .stderr(log_file(&self.run_dir, &format!("{id}.app.err.log"))?)
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                UpError::Failed(format!(
                    "{}: {e} (see {})",
                    program.display(),
                    app_log.display()
                ))
            })?;
        self.processes.push(Managed {
            label: format!("{id} app"),
            child,
        });
        wait_ready(admin, &format!("proxy of {id}"), &proxy_log).await?;
        self.replicas.push(Replica {
            service: svc.name.clone(),
            index,
            app,
            inbound,
            outbound,
            admin,
        });
        Ok(())
    }

    pub(crate) fn table(&self) -> String {
        let mut out = format!(
            "control plane   grpc {}   http http://{}\nrun directory   {}\n\n{:<14} {:<8} {:<22} {:<22} {:<22} {}\n",
            self.control.grpc_addr,
            self.control.http_addr,
            self.run_dir.display(),
            "SERVICE",
            "REPLICA",
            "APP",
            "PROXY INBOUND",
            "HTTP_PROXY",
            "ADMIN"
        );
        for r in &self.replicas {
            out.push_str(&format!(
                "{:<14} {:<8} {:<22} {:<22} {:<22} http://{}\n",
                r.service,
                r.index,
                r.app.to_string(),
                r.inbound.to_string(),
                r.outbound.to_string(),
                r.admin
            ));
        }
        out
    }

    /// Stops every process: SIGTERM, then SIGKILL after 10 s. Leaves nothing behind.
    pub(crate) async fn stop(&mut self) {
        for p in &self.processes {
            if let Some(pid) = p.child.id() {
                let _ = std::process::Command::new("kill")
                    .arg("-TERM")
                    .arg(pid.to_string())
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for p in &mut self.processes {
            let left = deadline.saturating_duration_since(Instant::now());
            if tokio::time::timeout(left, p.child.wait()).await.is_err() {
                tracing::warn!(process = %p.label, "did not stop in time; killing");
                let _ = p.child.kill().await;
            }
        }
        self.processes.clear();
        self.control.shutdown();
    }
}

/// Waits for Ctrl-C or SIGTERM.
pub(crate) async fn wait_for_stop() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => std::future::pending::<()>().await,
    }
}

pub(crate) async fn run(file: &Path, run_dir: Option<PathBuf>) -> Result<(), UpError> {
    let mesh = MeshFile::load(file)?;
    let run_dir = run_dir
        .unwrap_or_else(|| std::env::temp_dir().join(format!("trellis-up-{}", std::process::id())));
    let mut running = Mesh::start(&mesh, run_dir).await?;
    let context = crate::client::write_context(
        &format!("http://{}", running.control.http_addr),
        &running.control.admin_token,
    );
    println!("{}", running.table());
    if let Ok(path) = context {
        println!(
            "`trellis get services` talks to this mesh (context in {}).",
            path.display()
        );
    }
    println!("Press Ctrl-C to stop.");
    wait_for_stop().await;
    println!("stopping...");
    running.stop().await;
    Ok(())
}

fn write_private(path: &Path, contents: &str) -> Result<(), UpError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|e| UpError::Failed(format!("{}: {e}", path.display())))
}
