//! `trellis demo`: the example mesh (`examples/demo.yaml`) run by `trellis up`, plus a built-in
//! load generator and a live per-service summary (requests/s, success rate, p50/p99) read from
//! the proxies' own metrics — no code in the services, no Prometheus needed.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use crate::up::{Mesh, MeshFile, UpError};

const DEMO_MESH: &str = include_str!("../../../examples/demo.yaml");

#[derive(clap::Args, Clone)]
pub(crate) struct DemoArgs {
    /// Requests per second the load generator sends to the frontend.
    #[arg(long, default_value_t = 20)]
    rps: u32,
    /// Stop after this long (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<String>,
    /// Run directory for logs and state (default: a temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
}

#[derive(Default)]
struct LoadStats {
    sent: AtomicU64,
    ok: AtomicU64,
}

/// Inbound counters of one service, summed over its replicas.
#[derive(Default, Clone)]
struct ServiceCounters {
    total: f64,
    success: f64,
    /// Cumulative latency buckets: upper bound (s) → count.
    buckets: BTreeMap<u64, f64>,
}

fn parse_labels(s: &str) -> BTreeMap<&str, &str> {
    s.split("\",")
        .filter_map(|kv| {
            let (k, v) = kv.split_once("=\"")?;
            Some((k.trim_matches(','), v.trim_end_matches('"')))
        })
        .collect()
}

/// Adds one proxy's inbound HTTP metrics into `out`, keyed by service.
fn accumulate(text: &str, out: &mut BTreeMap<String, ServiceCounters>) {
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let labels = parse_labels(labels.trim_end_matches('}'));
        if labels.get("direction") != Some(&"inbound") {
            continue;
        }
        let Some(dst) = labels.get("dst") else {
            continue;
        };
        let c = out.entry((*dst).to_owned()).or_default();
        match name {
            "trellis_http_requests_total" => {
                c.total += value;
                if labels.get("classification") == Some(&"success") {
                    c.success += value;
                }
            }
            "trellis_http_request_duration_seconds_bucket" => {
                let le = labels
                    .get("le")
                    .and_then(|l| l.parse::<f64>().ok())
                    .unwrap_or(f64::INFINITY);
                let key = if le.is_finite() {
                    (le * 1e6) as u64
                } else {
                    u64::MAX
                };
                *c.buckets.entry(key).or_default() += value;
            }
            _ => {}
        }
    }
}

/// Quantile from cumulative bucket deltas (upper bound of the bucket that holds it).
fn quantile(now: &ServiceCounters, before: &ServiceCounters, q: f64) -> Option<Duration> {
    let deltas: Vec<(u64, f64)> = now
        .buckets
        .iter()
        .map(|(le, n)| (*le, n - before.buckets.get(le).copied().unwrap_or(0.0)))
        .collect();
    let total = deltas.last()?.1;
    if total <= 0.0 {
        return None;
    }
    deltas.iter().find(|(_, n)| *n >= q * total).map(|(le, _)| {
        if *le == u64::MAX {
            Duration::from_secs(10)
        } else {
            Duration::from_micros(*le)
        }
    })
}

async fn scrape(admin: SocketAddr) -> Option<String> {
    let stream = tokio::net::TcpStream::connect(admin).await.ok()?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/metrics")
        .header("host", "admin")
        .body(Empty::<Bytes>::new())
        .ok()?;
    let rsp = sender.send_request(req).await.ok()?;
    let body = rsp.into_body().collect().await.ok()?.to_bytes();
    Some(String::from_utf8_lossy(&body).into_owned())
}

async fn mesh_counters(mesh: &Mesh) -> BTreeMap<String, ServiceCounters> {
    let mut out = BTreeMap::new();
    for r in &mesh.replicas {
        if let Some(text) = scrape(r.admin).await {
            accumulate(&text, &mut out);
        }
    }
    out
}

fn summary(
    now: &BTreeMap<String, ServiceCounters>,
    before: &BTreeMap<String, ServiceCounters>,
    secs: f64,
) -> String {
    let mut out = format!(
        "{:<12} {:>8} {:>9} {:>9} {:>9}\n",
        "SERVICE", "RPS", "SUCCESS", "P50", "P99"
    );
    for (svc, c) in now {
        let b = before.get(svc).cloned().unwrap_or_default();
        let n = c.total - b.total;
        let ok = c.success - b.success;
        let fmt = |d: Option<Duration>| {
            d.map_or("-".into(), |d| format!("{}ms", d.as_secs_f64() * 1000.0))
        };
        out.push_str(&format!(
            "{:<12} {:>8.1} {:>8.1}% {:>9} {:>9}\n",
            svc,
            n / secs,
            if n > 0.0 { 100.0 * ok / n } else { 100.0 },
            fmt(quantile(c, &b, 0.5)),
            fmt(quantile(c, &b, 0.99)),
        ));
    }
    out
}

async fn load(frontend: Vec<SocketAddr>, rps: u32, stats: Arc<LoadStats>) {
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rps.max(1))));
    let mut i = 0usize;
    loop {
        tick.tick().await;
        let target = frontend[i % frontend.len()];
        i += 1;
        let stats = stats.clone();
        tokio::spawn(async move {
            stats.sent.fetch_add(1, Ordering::Relaxed);
            let ok = async {
                let stream = tokio::net::TcpStream::connect(target).await.ok()?;
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(TokioIo::new(stream))
                        .await
                        .ok()?;
                tokio::spawn(conn);
                let req = hyper::Request::get("/checkout")
                    .header("host", "frontend")
                    .body(Empty::<Bytes>::new())
                    .ok()?;
                let rsp = sender.send_request(req).await.ok()?;
                let status = rsp.status();
                rsp.into_body().collect().await.ok()?;
                status.is_success().then_some(())
            }
            .await;
            if ok.is_some() {
                stats.ok.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
}

pub(crate) async fn run(args: DemoArgs) -> Result<(), UpError> {
    let mesh_file: MeshFile = serde_saphyr::from_str(DEMO_MESH)
        .map_err(|e| UpError::Failed(format!("bundled demo mesh: {e}")))?;
    let duration = args
        .duration
        .as_deref()
        .map(trellis_core::duration::parse_duration)
        .transpose()
        .map_err(|e| UpError::Invalid {
            file: "--duration".into(),
            reason: e,
        })?;
    let run_dir = args.dir.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id()))
    });
    println!("Starting the Trellis demo mesh:");
    println!(
        "  frontend --HTTP--> orders (90% orders-v1 / 10% orders-v2 canary) --gRPC--> inventory x2"
    );
    println!(
        "  every hop between proxies is mTLS, with identities issued by the control plane's CA\n"
    );
    let mut mesh = Mesh::start(&mesh_file, run_dir).await?;
    let _ = crate::client::write_context(
        &format!("http://{}", mesh.control.http_addr),
        &mesh.control.admin_token,
    );
    enable_demo_tracing(&mesh);
    println!("{}", mesh.table());
    println!("Dashboard: http://{}/\n", mesh.control.http_addr);
    println!(
        "Try, in another terminal:  trellis stat   |   trellis edges   |   trellis top orders   |   trellis tap orders\n                           trellis get audit --since 10m   |   trellis explain frontend orders   |   trellis check\n"
    );

    // The load generator calls the frontend from inside the mesh, through a frontend proxy's
    // outbound (HTTP proxy) listener: proxy-to-proxy traffic is mTLS only, so plaintext at an
    // inbound port would be refused.
    let frontend: Vec<SocketAddr> = mesh
        .replicas
        .iter()
        .filter(|r| r.service == "frontend")
        .map(|r| r.outbound)
        .collect();
    let stats = Arc::new(LoadStats::default());
    let generator = tokio::spawn(load(frontend, args.rps, stats.clone()));
    println!(
        "Sending {} requests/s to frontend. Live summary from the proxies' metrics (Ctrl-C to stop):\n",
        args.rps
    );

    let started = Instant::now();
    let mut before = mesh_counters(&mesh).await;
    let mut last = Instant::now();
    let first = before.clone();
    let stop = crate::up::wait_for_stop();
    tokio::pin!(stop);
    loop {
        let remaining = duration.map(|d| d.saturating_sub(started.elapsed()));
        let interval = remaining.map_or(Duration::from_secs(3), |r| r.min(Duration::from_secs(3)));
        tokio::select! {
            _ = &mut stop => break,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = mesh_counters(&mesh).await;
        println!("{}", summary(&now, &before, last.elapsed().as_secs_f64()));
        before = now;
        last = Instant::now();
        if remaining.is_some_and(|r| r <= interval) {
            break;
        }
    }
    generator.abort();
    let total = mesh_counters(&mesh).await;
    let sent = stats.sent.load(Ordering::Relaxed);
    let ok = stats.ok.load(Ordering::Relaxed);
    println!(
        "Whole run ({:.0}s):\n{}",
        started.elapsed().as_secs_f64(),
        summary(&total, &first, started.elapsed().as_secs_f64())
    );
    println!("Load generator: {sent} requests sent, {ok} succeeded end to end.");
    println!("Stopping the mesh...");
    mesh.stop().await;
    println!("Stopped; logs are in {}", mesh.run_dir.display());
    if ok == 0 {
        return Err(UpError::Failed("no request succeeded; see the logs".into()));
    }
    Ok(())
}

/// Without a MeshConfig of the mesh's own, the demo samples 10% of requests and exports the
/// spans to the control plane's built-in trace view (the dashboard's "Recent traces").
fn enable_demo_tracing(mesh: &Mesh) {
    use trellis_core::resources::Kind;
    let store = &mesh.control.store;
    if store
        .list(Some(Kind::MeshConfig))
        .is_ok_and(|configs| !configs.is_empty())
    {
        return;
    }
    let yaml = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  tracing: {{sampling: 0.1, otlpEndpoint: \"http://{}\", protocol: http/protobuf}}\n",
        mesh.control.http_addr
    );
    match trellis_core::resources::parse_documents(&yaml) {
        Ok(docs) => {
            if let Err(e) = store.apply(&docs, "trellis-demo", false) {
                eprintln!("trellis demo: tracing not enabled: {e}");
            }
        }
        Err(e) => eprintln!("trellis demo: tracing not enabled: {e:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarises_inbound_metrics() {
        let before = "trellis_http_requests_total{direction=\"inbound\",src=\"unknown\",dst=\"orders\",route=\"default\",code=\"200\",classification=\"success\"} 10\n";
        let now = "trellis_http_requests_total{direction=\"inbound\",src=\"unknown\",dst=\"orders\",route=\"default\",code=\"200\",classification=\"success\"} 28\n\
trellis_http_requests_total{direction=\"inbound\",src=\"unknown\",dst=\"orders\",route=\"default\",code=\"500\",classification=\"failure\"} 2\n\
trellis_http_request_duration_seconds_bucket{le=\"0.005\",direction=\"inbound\",src=\"unknown\",dst=\"orders\",route=\"default\",classification=\"success\"} 15\n\
trellis_http_request_duration_seconds_bucket{le=\"0.05\",direction=\"inbound\",src=\"unknown\",dst=\"orders\",route=\"default\",classification=\"success\"} 20\n\
trellis_http_request_duration_seconds_bucket{le=\"+Inf\",direction=\"inbound\",src=\"unknown\",dst=\"orders\",route=\"default\",classification=\"success\"} 20\n\
trellis_http_requests_total{direction=\"outbound\",src=\"orders\",dst=\"inventory\",route=\"default\",code=\"200\",classification=\"success\"} 99\n";
        let (mut b, mut n) = (BTreeMap::new(), BTreeMap::new());
        accumulate(before, &mut b);
        accumulate(now, &mut n);
        assert!(
            !n.contains_key("inventory"),
            "outbound series are not a service's own traffic"
        );
        let text = summary(&n, &b, 2.0);
        assert!(text.contains("orders"), "{text}");
        assert!(text.contains("10.0"), "20 requests in 2 s: {text}");
        assert!(text.contains("90.0%"), "18 of 20 succeeded: {text}");
        assert!(text.contains("5ms"), "p50 in the 5 ms bucket: {text}");
        assert!(text.contains("50ms"), "p99 in the 50 ms bucket: {text}");
    }
}
