//! Control-plane push benchmark: simulates a large mesh against a real `trellis control`.
//!
//! `trellis-bench-push --control GRPC --http HTTP --pid PID [--instances 10000] [--services
//! 1000] [--watch 5] [--changes 50]` opens one session per instance (like one proxy each),
//! registers them (services × replicas), has every proxy watch a few random services, then
//! makes changes and measures the time from each change to the moment every affected proxy has
//! received it:
//! - route changes: an HTTPRoute applied through the HTTP API (timed from the request);
//! - instance churn: a session closes (the instance leaves; timed from the close).
//!
//! Prints p50/p99/max per kind and the control plane's RSS (VmRSS of `--pid`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Mutex, mpsc};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use trellis_api::pb;

struct Args {
    control: String,
    http: String,
    /// The control plane's data dir: admin token and trust bundle.
    data_dir: std::path::PathBuf,
    pid: u32,
    instances: usize,
    services: usize,
    watch: usize,
    changes: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        control: String::new(),
        http: String::new(),
        data_dir: Default::default(),
        pid: 0,
        instances: 10_000,
        services: 1_000,
        watch: 5,
        changes: 50,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let num = |v: &str| {
            v.parse::<usize>()
                .map_err(|_| format!("{flag}: {v:?} is not a number"))
        };
        match flag.as_str() {
            "--control" => a.control = v,
            "--http" => a.http = v,
            "--data-dir" => a.data_dir = v.into(),
            "--pid" => a.pid = v.parse().map_err(|_| "bad --pid".to_string())?,
            "--instances" => a.instances = num(&v)?,
            "--services" => a.services = num(&v)?,
            "--watch" => a.watch = num(&v)?,
            "--changes" => a.changes = num(&v)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    if a.control.is_empty() || a.http.is_empty() || a.data_dir.as_os_str().is_empty() {
        return Err(
            "usage: trellis-bench-push --control GRPC_ADDR --http HTTP_ADDR --data-dir DIR --pid PID"
                .into(),
        );
    }
    Ok(a)
}

/// Arrival times of updates, per (service, marker) → count of proxies that saw it.
type Seen = Arc<Mutex<HashMap<String, Vec<Instant>>>>;

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn percentiles(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort();
    let p = |q: f64| v[((v.len() - 1) as f64 * q) as usize];
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} samples)",
        p(0.5).as_secs_f64() * 1e3,
        p(0.99).as_secs_f64() * 1e3,
        v[v.len() - 1].as_secs_f64() * 1e3,
        v.len()
    )
}

async fn post(http: &str, admin: &str, path: &str, body: String) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: c\r\nAuthorization: Bearer {admin}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out)
        .await
        .map_err(|e| e.to_string())?;
    if out.starts_with("HTTP/1.1 200") {
        Ok(out)
    } else {
        Err(out)
    }
}

async fn apply(http: &str, admin: &str, yaml: String) -> Result<(), String> {
    post(http, admin, "/api/v1/apply", yaml).await.map(|_| ())
}

/// A TLS channel to the control plane holding a certificate for `service` (join token, CSR,
/// Certify), as the proxies of that service would.
async fn channel_as(
    args: &Args,
    admin: &str,
    service: &str,
) -> Result<tonic::transport::Channel, String> {
    let bundle = std::fs::read(args.data_dir.join("ca/bundle.pem")).map_err(|e| e.to_string())?;
    let roots = trellis_api::tls::root_store(&bundle).map_err(|e| e.to_string())?;
    let cp_id = trellis_core::identity::SpiffeId::control_plane("trellis.local");
    let answer = post(
        &args.http,
        admin,
        "/api/v1/tokens",
        format!("{{\"service\":\"{service}\"}}"),
    )
    .await?;
    let token = answer
        .split("\"token\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .ok_or("no token in answer")?
        .to_owned();
    let id = trellis_core::identity::SpiffeId::new(
        "trellis.local",
        trellis_core::Namespace::default(),
        trellis_core::ServiceName::new(service).map_err(|e| e.to_string())?,
    );
    let (key, csr) = trellis_proxy::identity::new_key_and_csr(&id).map_err(|e| e.to_string())?;
    let anon = trellis_api::tls::client_config(roots.clone(), cp_id.clone(), None)
        .map_err(|e| e.to_string())?;
    let ch = trellis_api::tls::grpc_channel(&args.control, anon, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())?;
    let cert = pb::proxy_control_client::ProxyControlClient::new(ch)
        .certify(pb::CertifyRequest {
            csr_pem: csr,
            token,
        })
        .await
        .map_err(|e| e.to_string())?
        .into_inner();
    let key = trellis_api::tls::certified_key(cert.cert_chain_pem.as_bytes(), key.as_bytes())
        .map_err(|e| e.to_string())?;
    let config = trellis_api::tls::client_config(
        roots,
        cp_id,
        Some(trellis_api::tls::CertResolver::new(key)),
    )
    .map_err(|e| e.to_string())?;
    trellis_api::tls::grpc_channel(&args.control, config, Duration::from_secs(10))
        .await
        .map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = parse_args()?;
    let replicas = (args.instances / args.services).max(1);
    let rss_before = rss_mb(args.pid);
    // One mTLS connection per service, holding that service's certificate; the sessions of
    // its instances share it (the control plane's work per session is the same).
    let admin = std::fs::read_to_string(args.data_dir.join("admin-token"))
        .map_err(|e| format!("admin token: {e}"))?
        .trim()
        .to_owned();
    let mut channels: Vec<tonic::transport::Channel> = Vec::new();
    for svc in 0..args.services {
        channels.push(channel_as(&args, &admin, &format!("svc-{svc}")).await?);
    }
    let seen: Seen = Arc::default();
    let updates = Arc::new(AtomicU64::new(0));
    // Sessions whose stream failed (they stop receiving; reported, and a failure of the run).
    let dead = Arc::new(AtomicU64::new(0));
    let mut closers = Vec::new();
    let mut watchers_of: HashMap<String, usize> = HashMap::new();
    let mut watch_lists: Vec<Vec<String>> = Vec::new();
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let started = Instant::now();
    for i in 0..args.instances {
        let service = format!("svc-{}", i % args.services);
        let instance = pb::Instance {
            service: service.clone(),
            namespace: "default".into(),
            instance_id: format!("{service}-{}", i / args.services),
            address: format!("127.0.0.{}:{}", 1 + (i / 60000), 1024 + (i % 60000)),
            zone: String::new(),
            labels: Default::default(),
        };
        let mut watching: Vec<String> = (0..args.watch)
            .map(|_| format!("svc-{}", rng(&mut seed) as usize % args.services))
            .collect();
        watching.sort();
        watching.dedup();
        for w in &watching {
            *watchers_of.entry(w.clone()).or_default() += 1;
        }
        watch_lists.push(watching.clone());
        let (tx, rx) = mpsc::channel(16);
        let _ = tx.try_send(pb::ProxyMessage {
            message: Some(pb::proxy_message::Message::Register(pb::Register {
                instance: Some(instance),
                watching,
            })),
        });
        let mut client =
            pb::proxy_control_client::ProxyControlClient::new(channels[i % args.services].clone());
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(|e| e.to_string())?
            .into_inner();
        let (seen, updates, dead) = (seen.clone(), updates.clone(), dead.clone());
        tokio::spawn(async move {
            loop {
                let m = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(status) => {
                        dead.fetch_add(1, Ordering::Relaxed);
                        eprintln!("session {i} ended: {status}");
                        break;
                    }
                };
                if let Some(pb::control_message::Message::Destination(d)) = m.message {
                    updates.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    let mut seen = seen.lock().await;
                    if let Some(routes) = &d.routes {
                        for r in &routes.rules {
                            seen.entry(format!("route {}", r.name))
                                .or_default()
                                .push(now);
                        }
                    }
                    for id in &d.removed {
                        seen.entry(format!("removed {id}")).or_default().push(now);
                    }
                }
            }
        });
        // Heartbeats like a real proxy's (the default TTL is 10 s), so no session expires
        // during the run; a weak handle, so dropping the closer still ends the stream.
        let beat = tx.downgrade();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(3)).await;
                let Some(tx) = beat.upgrade() else { break };
                let hb = pb::ProxyMessage {
                    message: Some(pb::proxy_message::Message::Heartbeat(
                        pb::Heartbeat::default(),
                    )),
                };
                if tx.send(hb).await.is_err() {
                    break;
                }
            }
        });
        closers.push(tx);
    }
    eprintln!(
        "{} sessions registered in {:.1}s; waiting for initial snapshots...",
        args.instances,
        started.elapsed().as_secs_f64()
    );
    // Registration makes a storm of updates (every registration reaches every watcher of its
    // service). Wait until it has been delivered: no update for two seconds.
    let wait_start = Instant::now();
    let mut last = u64::MAX;
    let mut quiet_since = Instant::now();
    while wait_start.elapsed() < Duration::from_secs(300) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let n = updates.load(Ordering::Relaxed);
        if n != last {
            last = n;
            quiet_since = Instant::now();
        } else if quiet_since.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    eprintln!(
        "registration updates delivered: {last} in {:.1}s",
        wait_start.elapsed().as_secs_f64()
    );
    let rss_loaded = rss_mb(args.pid);

    let mut closed = std::collections::HashSet::new();
    let mut route_latency = Vec::new();
    let mut churn_latency = Vec::new();
    for c in 0..args.changes {
        // A route change on a watched service.
        let target = format!("svc-{}", rng(&mut seed) as usize % args.services);
        let expect = watchers_of.get(&target).copied().unwrap_or(0);
        let marker = format!("bench-{c}");
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: {marker}}}\nspec:\n  parentRefs: [{{name: {target}}}]\n  rules:\n    - matches: [{{path: {{value: /{marker}}}}}]\n      backendRefs: [{{name: {target}}}]\n"
        );
        let t0 = Instant::now();
        apply(&args.http, &admin, yaml).await?;
        if let Some(d) = wait_for(&seen, &format!("route {marker}"), expect, t0).await {
            route_latency.push(d);
        }
        // Instance churn: close one session; its watchers see it removed.
        let idx = loop {
            let i = rng(&mut seed) as usize % closers.len();
            if !closed.contains(&i) {
                closed.insert(i);
                break i;
            }
        };
        let service = format!("svc-{}", idx % args.services);
        let id = format!("{service}-{}", idx / args.services);
        let expect = watchers_of.get(&service).copied().unwrap_or(0);
        let (tx, _) = mpsc::channel(1);
        let t0 = Instant::now();
        drop(std::mem::replace(&mut closers[idx], tx));
        // The closed proxy no longer receives anything: it stops counting as a watcher.
        for w in &watch_lists[idx] {
            if let Some(n) = watchers_of.get_mut(w) {
                *n -= 1;
            }
        }
        if let Some(d) = wait_for(&seen, &format!("removed {id}"), expect, t0).await {
            churn_latency.push(d);
        }
    }
    let _ = replicas;
    println!("## Control-plane push benchmark\n");
    println!(
        "- {} instances ({} services × {} replicas), one session each; each proxy watches {} services",
        args.instances, args.services, replicas, args.watch
    );
    println!(
        "- route change → every watching proxy has it: {}",
        percentiles(route_latency)
    );
    println!(
        "- instance leaves → every watching proxy has it: {}",
        percentiles(churn_latency)
    );
    println!(
        "- simulated sessions whose stream failed: {}",
        dead.load(Ordering::Relaxed)
    );
    println!(
        "- control plane RSS: {rss_before:.1} MB idle, {rss_loaded:.1} MB with the mesh connected, {:.1} MB at the end",
        rss_mb(args.pid)
    );
    Ok(())
}

/// Waits until `expect` proxies recorded `key`; returns the time from `t0` to the last one.
async fn wait_for(seen: &Seen, key: &str, expect: usize, t0: Instant) -> Option<Duration> {
    if expect == 0 {
        return None;
    }
    let deadline = t0 + Duration::from_secs(30);
    loop {
        {
            let s = seen.lock().await;
            if let Some(times) = s.get(key)
                && times.len() >= expect
            {
                return times.iter().max().map(|t| t.duration_since(t0));
            }
        }
        if Instant::now() > deadline {
            let got = seen.lock().await.get(key).map_or(0, Vec::len);
            eprintln!("{key}: {got} of {expect} watchers got it within 30 s");
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
