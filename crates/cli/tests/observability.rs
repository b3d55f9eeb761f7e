//! Observability end to end: golden signals merged by the control plane from real proxies,
//! `trellis stat`/`edges`/`top`/`tap`, tracing through three services into an OTLP receiver,
//! bounded cardinality, the audit log (denials, certificates) and access logs switched by
//! MeshConfig at run time.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use common::{Client, apply, caller, control, instance, load, metrics_of, proxy, wait_endpoints};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_core::signals::{Direction, merge_buckets};
use trellis_test_support::eventually;
use trellis_test_support::http_server::Behavior;
use trellis_test_support::mesh::{ControlPlane, http_call};
use trellis_test_support::otlp::OtlpReceiver;
use trellis_test_support::process::ProxyProcess;

async fn get_json(cp: &ControlPlane, path: &str) -> Value {
    let (status, body) = http_call(cp.http, "GET", path, "", None).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
}

fn cli_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_trellis"))
}

fn proxy_bin() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_trellis")).with_file_name("trellis-proxy")
}

/// Runs the real CLI against `cp`; returns stdout (asserts success).
fn cli(cp: &ControlPlane, args: &[&str]) -> String {
    let out = std::process::Command::new(cli_bin())
        .arg("--control-http")
        .arg(format!("http://{}", cp.http))
        .args(args)
        .env("TRELLIS_ADMIN_TOKEN", cp.admin_token())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "trellis {args:?}: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn item<'a>(body: &'a Value, key: &str, value: &str) -> &'a Value {
    body["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i[key] == value)
        .unwrap_or_else(|| panic!("no item with {key}={value} in {body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn golden_signals_match_the_traffic_and_merge_across_proxies() {
    let (_running, cp) = control("obs-signals", |_| {}).await;
    let mut webs = Vec::new();
    for i in 0..3 {
        let behavior = Behavior {
            delay: Duration::from_millis(5),
            // One instance fails every 10th request: a success rate below 100%.
            fail_every: if i == 0 { 10 } else { 0 },
            ..Behavior::default()
        };
        webs.push(instance("web", &format!("web-{i}"), behavior, &cp, &[]).await);
    }
    let (client, up) = caller(&cp, "web", &[]).await;
    wait_endpoints(&client, "web", 3).await;

    let answers = load(up, "web", 200, Duration::from_secs(2), 4).await;
    let total = answers.len() as u64;
    let ok = answers.iter().filter(|a| a.status == 200).count() as u64;
    assert!(ok < total, "some requests failed on purpose");

    let services = get_json(&cp, "/api/v1/stats/services?service=web").await;
    assert_eq!(services["proxies_asked"], services["proxies_answered"]);
    let web = item(&services, "service", "web");
    assert_eq!(web["requests"], total, "every request counted once: {web}");
    assert_eq!(web["instances"], 3);
    let success = web["success_rate"].as_f64().unwrap();
    assert_eq!((success * total as f64).round() as u64, ok);
    assert_eq!(web["tls_share"], 1.0, "proxy-to-proxy traffic is mTLS");
    // Every request waited 5 ms in the app: no percentile can be below that (minus the
    // sketch's 1% error).
    let p50 = web["latency_ms"]["p50"].as_f64().unwrap();
    assert!(p50 >= 5.0 * 0.99, "p50 {p50}");
    let sparkline: u64 = web["series"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["requests"].as_u64().unwrap())
        .sum();
    assert_eq!(sparkline, total);

    // The merge of the three servers' windows is what the control plane shows, exactly; and
    // its counts equal the one client proxy's window of the combined traffic.
    let inbound: Vec<_> = webs
        .iter()
        .flat_map(|(_, p)| p.metrics.signals.last(60))
        .collect();
    let merged = merge_buckets(&inbound);
    let mut servers = trellis_core::signals::Window::default();
    for b in merged.values() {
        for (k, w) in &b.series {
            if k.direction == Direction::Inbound {
                servers.merge(w);
            }
        }
    }
    assert_eq!(servers.requests, total);
    let summary = servers.summary(1.0);
    // The same sketch bin (JSON may round the last bit of the float).
    let (api_p99, local_p99) = (
        web["latency_ms"]["p99"].as_f64().unwrap(),
        summary.latency_ms.p99.unwrap(),
    );
    assert!(
        (api_p99 - local_p99).abs() <= local_p99 * 1e-12,
        "{api_p99} vs {local_p99}"
    );
    let mut combined = trellis_core::signals::Window::default();
    for b in client.metrics.signals.last(60) {
        for (k, w) in &b.series {
            if k.direction == Direction::Outbound {
                combined.merge(w);
            }
        }
    }
    assert_eq!(
        (combined.requests, combined.failures),
        (servers.requests, servers.failures)
    );

    let edges = get_json(&cp, "/api/v1/stats/edges").await;
    let edge = item(&edges, "dst", "web");
    assert_eq!(edge["src"], "client");
    assert_eq!(edge["requests"], total);
    assert_eq!(
        edge["dst_identity"],
        "spiffe://trellis.local/ns/default/svc/web"
    );
    let routes = get_json(&cp, "/api/v1/stats/routes?service=web").await;
    assert_eq!(item(&routes, "route", "default")["requests"], total);
    let paths = get_json(&cp, "/api/v1/stats/paths?service=web").await;
    assert_eq!(item(&paths, "path", "/")["requests"], total);

    // The CLI shows the same numbers.
    let table = cli(&cp, &["stat", "web"]);
    let row = table
        .lines()
        .find(|l| l.starts_with("web "))
        .unwrap_or_else(|| panic!("no web row:\n{table}"));
    assert!(row.contains(" 3 "), "{row}");
    assert!(
        table.contains("ROUTE") && table.contains("default"),
        "{table}"
    );
    let json: Value = serde_json::from_str(&cli(&cp, &["stat", "-o", "json"])).unwrap();
    assert_eq!(item(&json, "service", "web")["requests"], total);
    let edges_table = cli(&cp, &["edges"]);
    assert!(
        edges_table.contains("client")
            && edges_table.contains("spiffe://trellis.local/ns/default/svc/web"),
        "{edges_table}"
    );
    let top = cli(&cp, &["top", "web", "--once"]);
    assert!(
        top.contains("GET") && top.contains(&total.to_string()),
        "{top}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_requests_and_stops_when_the_client_disconnects() {
    let (_running, cp) = control("obs-tap", |_| {}).await;
    let (_app, web) = instance("web", "web-0", Behavior::default(), &cp, &[]).await;
    let (client, up) = caller(&cp, "web", &[]).await;
    wait_endpoints(&client, "web", 1).await;

    // Operators only.
    let (status, _) = http_call(cp.http, "GET", "/api/v1/tap?service=web", "", None).await;
    assert_eq!(status, 401);

    let mut tap = tokio::net::TcpStream::connect(cp.http).await.unwrap();
    let head = format!(
        "GET /api/v1/tap?service=web&path=/tapped HTTP/1.1\r\nHost: control\r\nAuthorization: Bearer {}\r\n\r\n",
        cp.admin_token()
    );
    tap.write_all(head.as_bytes()).await.unwrap();
    eventually(
        "the tap reaches the proxy",
        Duration::from_secs(5),
        || async { (web.metrics.tap.subscribers() == 1).then_some(()) },
    )
    .await;

    let sender = tokio::spawn(async move {
        let mut c = Client::connect(up).await;
        for i in 0..20 {
            c.call("web", &format!("/tapped/{i}"), &[]).await;
            c.call("web", "/not-tapped", &[]).await;
        }
    });
    let mut seen = String::new();
    let mut buf = vec![0u8; 16 * 1024];
    let events: Vec<Value> = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), tap.read(&mut buf))
            .await
            .expect("tap events in time")
            .unwrap();
        assert!(n > 0, "tap ended early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        let events: Vec<Value> = seen
            .lines()
            .filter(|l| l.starts_with('{'))
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if events.len() >= 5 {
            break events;
        }
    };
    sender.await.unwrap();
    for e in &events {
        assert!(e["path"].as_str().unwrap().starts_with("/tapped/"), "{e}");
        assert_eq!(e["status"], 200);
        assert_eq!(e["dst"], "web");
        assert_eq!(e["src"], "client");
        assert_eq!(e["direction"], "inbound");
        assert!(e["latency_ms"].as_f64().unwrap() >= 0.0);
        assert!(e["time"].as_str().unwrap().ends_with('Z'));
    }

    // The proxy's own admin `/tap` (localhost): the same records, ending after `limit`.
    let admin = web.bound.admin;
    let local =
        tokio::spawn(
            async move { http_call(admin, "GET", "/tap?path=/local&limit=3", "", None).await },
        );
    eventually(
        "the local tap subscribes",
        Duration::from_secs(5),
        || async { (web.metrics.tap.subscribers() == 2).then_some(()) },
    )
    .await;
    let mut c = Client::connect(up).await;
    for i in 0..5 {
        c.call("web", &format!("/local/{i}"), &[]).await;
    }
    let (status, body) = local.await.unwrap();
    assert_eq!(status, 200);
    let local: Vec<Value> = body
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(local.len(), 3, "{body}");
    assert_eq!(local[0]["path"], "/local/0");

    // The CLI: `trellis tap` prints requests as they happen and exits after --max.
    let mut cli_tap = tokio::process::Command::new(cli_bin())
        .args(["--control-http", &format!("http://{}", cp.http)])
        .args(["tap", "web", "--path", "/cli", "--max", "3", "-o", "json"])
        .env("TRELLIS_ADMIN_TOKEN", cp.admin_token())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    eventually(
        "the CLI's tap reaches the proxy",
        Duration::from_secs(10),
        || async { (web.metrics.tap.subscribers() == 2).then_some(()) },
    )
    .await;
    for i in 0..5 {
        c.call("web", &format!("/cli/{i}"), &[]).await;
    }
    let status = tokio::time::timeout(Duration::from_secs(10), cli_tap.wait())
        .await
        .expect("trellis tap exits after --max")
        .unwrap();
    assert!(status.success());
    let mut printed = String::new();
    cli_tap
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut printed)
        .await
        .unwrap();
    let paths: Vec<String> = printed
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["path"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(paths, ["/cli/0", "/cli/1", "/cli/2"]);

    drop(tap);
    eventually(
        "the proxy's tap ends with the client",
        Duration::from_secs(15),
        || async { (web.metrics.tap.subscribers() == 0).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_through_three_services_reaches_the_otlp_receiver() {
    let receiver = OtlpReceiver::spawn().await;
    let (_running, cp) = control("obs-trace", |_| {}).await;
    apply(
        &cp,
        &format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  tracing: {{sampling: 1.0, otlpEndpoint: \"{}\"}}\n",
            receiver.grpc_endpoint
        ),
    )
    .await;
    let c = chain_link_with_app(&cp, "svc-c", None).await;
    let b = chain_link_with_app(&cp, "svc-b", Some("svc-c")).await;
    let a = chain_link_with_app(&cp, "svc-a", Some("svc-b")).await;
    let (client, up) = caller(&cp, "svc-a", &[]).await;
    wait_endpoints(&client, "svc-a", 1).await;
    wait_tracing(&[&a.0, &b.0, &c.0, &client]).await;

    let mut caller_client = Client::connect(up).await;
    let answer = caller_client.call("svc-a", "/start", &[]).await;
    assert_eq!(answer.status, 200, "{answer:?}");

    // client (CLIENT) -> a (SERVER) -> a (CLIENT) -> b (SERVER) -> b (CLIENT) -> c (SERVER)
    let spans = eventually("six spans exported", Duration::from_secs(10), || async {
        let spans = receiver.spans();
        (spans.len() >= 6).then_some(spans)
    })
    .await;
    assert_eq!(spans.len(), 6, "{spans:#?}");
    let trace_id = spans[0].span.trace_id.clone();
    assert!(
        spans.iter().all(|s| s.span.trace_id == trace_id),
        "one trace"
    );
    let roots: Vec<_> = spans
        .iter()
        .filter(|s| s.span.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1);
    assert_eq!(roots[0].service, "client");
    // Walk the chain from the root: each span's only child is the next hop.
    let mut expected = vec![
        ("client", 3),
        ("svc-a", 2),
        ("svc-a", 3),
        ("svc-b", 2),
        ("svc-b", 3),
        ("svc-c", 2),
    ]
    .into_iter();
    let mut current = roots[0];
    loop {
        let (service, kind) = expected.next().unwrap();
        assert_eq!(
            (current.service.as_str(), current.span.kind),
            (service, kind)
        );
        let status = current
            .span
            .attributes
            .iter()
            .find(|kv| kv.key == "http.response.status_code");
        assert!(status.is_some(), "status on every span");
        let children: Vec<_> = spans
            .iter()
            .filter(|s| s.span.parent_span_id == current.span.span_id)
            .collect();
        if children.is_empty() {
            break;
        }
        assert_eq!(children.len(), 1);
        current = children[0];
    }
    assert!(expected.next().is_none(), "the chain has all six hops");

    // A collector that goes away costs spans, counted, and never requests.
    drop(receiver);
    for _ in 0..5 {
        assert_eq!(caller_client.call("svc-a", "/start", &[]).await.status, 200);
    }
    eventually("dropped spans counted", Duration::from_secs(15), || async {
        let m = metrics_of(&client).await;
        m.lines()
            .any(|l| l.starts_with("trellis_trace_spans_dropped_total{reason=\"export-failed\"}"))
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_callers_are_joined_and_spans_export_over_otlp_http() {
    let receiver = OtlpReceiver::spawn().await;
    let (_running, cp) = control("obs-b3", |_| {}).await;
    // Sampling 0: only the caller's sampled flag makes these spans.
    apply(
        &cp,
        &format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec:\n  tracing: {{sampling: 0.0, otlpEndpoint: \"{}\", protocol: http/protobuf}}\n",
            receiver.http_endpoint
        ),
    )
    .await;
    let (_app, web) = instance("web", "web-0", Behavior::default(), &cp, &[]).await;
    let (client, up) = caller(&cp, "web", &[]).await;
    wait_endpoints(&client, "web", 1).await;
    wait_tracing(&[&web, &client]).await;
    let mut c = Client::connect(up).await;
    // Not sampled by the caller: no spans. Sent first: each proxy exports its spans in order,
    // so once the sampled request's spans are in, any from this one would be too.
    let unsampled = "80f198ee56343ba864fe8b2a57d3eff8-e457b5a2e4d86bd1-0";
    assert_eq!(c.call("web", "/", &[("b3", unsampled)]).await.status, 200);
    let b3 = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1";
    assert_eq!(c.call("web", "/", &[("b3", b3)]).await.status, 200);

    let spans = eventually(
        "spans from both proxies",
        Duration::from_secs(10),
        || async {
            let spans = receiver.spans();
            let services: std::collections::HashSet<String> =
                spans.iter().map(|s| s.service.clone()).collect();
            (services.len() == 2).then_some(spans)
        },
    )
    .await;
    assert_eq!(spans.len(), 2, "the unsampled request made none");
    let hex = trellis_api::otlp::hex;
    let client_span = spans.iter().find(|s| s.service == "client").unwrap();
    let web_span = spans.iter().find(|s| s.service == "web").unwrap();
    assert_eq!(
        hex(&client_span.span.trace_id),
        "80f198ee56343ba864fe8b2a57d3eff7"
    );
    assert_eq!(hex(&client_span.span.parent_span_id), "e457b5a2e4d86bd1");
    assert_eq!(web_span.span.trace_id, client_span.span.trace_id);
    assert_eq!(web_span.span.parent_span_id, client_span.span.span_id);
    let peer = web_span
        .span
        .attributes
        .iter()
        .find(|kv| kv.key == "trellis.peer.identity")
        .and_then(|kv| kv.value.as_ref())
        .map(trellis_api::otlp::value_text);
    assert_eq!(
        peer.as_deref(),
        Some("spiffe://trellis.local/ns/default/svc/client"),
        "the server span names the verified caller"
    );
}

/// Waits until MeshConfig `tracing` reached every one of `proxies`.
async fn wait_tracing(proxies: &[&trellis_proxy::app::Running]) {
    for p in proxies {
        eventually(
            "tracing configured",
            Duration::from_secs(5),
            || async move {
                let (_, body) = http_call(p.bound.admin, "GET", "/config", "", None).await;
                body.contains("\"tracing\": true").then_some(())
            },
        )
        .await;
    }
}

/// A chain link: a test app that calls `next` through its proxy's outbound listener and
/// passes the trace headers on, as an instrumented app would; then its proxy.
async fn chain_link_with_app(
    cp: &ControlPlane,
    service: &str,
    next: Option<&'static str>,
) -> (trellis_proxy::app::Running, SocketAddr) {
    // The app needs the proxy's outbound address and the proxy needs the app's: the app
    // starts first and learns the outbound address once the proxy is up.
    let outbound = std::sync::Arc::new(tokio::sync::OnceCell::new());
    let app = late_chaining_app(outbound.clone(), next).await;
    let app_str = app.to_string();
    let p = proxy(service, cp, &["--app", &app_str, "--instance", service]).await;
    outbound.set(p.bound.outbound).unwrap();
    (p, app)
}

async fn late_chaining_app(
    outbound: std::sync::Arc<tokio::sync::OnceCell<SocketAddr>>,
    next: Option<&'static str>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let outbound = outbound.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let outbound = outbound.clone();
                        async move {
                            let Some(next) = next else {
                                return Ok::<_, std::convert::Infallible>(http::Response::new(
                                    Full::new(Bytes::from_static(b"end of chain")),
                                ));
                            };
                            let Some(outbound) = outbound.get().copied() else {
                                let mut rsp = http::Response::new(Full::new(Bytes::new()));
                                *rsp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
                                return Ok(rsp);
                            };
                            let mut c = Client::connect(outbound).await;
                            let headers: Vec<(String, String)> = ["traceparent", "b3"]
                                .iter()
                                .filter_map(|n| {
                                    Some((
                                        n.to_string(),
                                        req.headers().get(*n)?.to_str().ok()?.to_owned(),
                                    ))
                                })
                                .collect();
                            let refs: Vec<(&str, &str)> = headers
                                .iter()
                                .map(|(k, v)| (k.as_str(), v.as_str()))
                                .collect();
                            let answer = c.call(next, "/chain", &refs).await;
                            let mut rsp = http::Response::new(Full::new(Bytes::new()));
                            *rsp.status_mut() = http::StatusCode::from_u16(answer.status).unwrap();
                            Ok(rsp)
                        }
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cardinality_stays_bounded_with_100k_distinct_paths() {
    let (_running, cp) = control("obs-cardinality", |_| {}).await;
    apply(
        &cp,
        "apiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  metrics: {maxPaths: 50, maxRoutesPerService: 20}\n",
    )
    .await;
    let (_app, web) = instance("web", "web-0", Behavior::default(), &cp, &[]).await;
    let (client, up) = caller(&cp, "web", &[]).await;
    wait_endpoints(&client, "web", 1).await;
    let before = metrics_of(&web).await.lines().count();

    const PATHS: u32 = 100_000;
    const CONNECTIONS: u32 = 32;
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(up).await;
            let mut ok = 0u32;
            for i in (c..PATHS).step_by(CONNECTIONS as usize) {
                ok += u32::from(
                    client
                        .call("web", &format!("/item/{i}?q={i}"), &[])
                        .await
                        .status
                        == 200,
                );
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.unwrap();
    }
    assert_eq!(ok, PATHS);

    // The proxies' Prometheus output did not grow with the paths (route names, not paths, are
    // labels), and neither did the golden-signal windows (50 paths + `other` per bucket).
    for p in [&web, &client] {
        let lines = metrics_of(p).await.lines().count();
        assert!(lines < before + 200, "{lines} metric lines");
        for b in p.metrics.signals.last(300) {
            assert!(b.paths.len() <= 51, "{} paths kept", b.paths.len());
            assert!(b.series.len() <= 21);
        }
    }
    // Totals stay exact: the paths kept (the last minute's buckets) add up to the requests
    // of the same buckets, `other` included.
    let mut expected = 0;
    for b in web.metrics.signals.last(300) {
        if b.paths.is_empty() {
            continue;
        }
        let series: u64 = b.series.values().map(|w| w.requests).sum();
        let paths: u64 = b.paths.values().map(|w| w.requests).sum();
        assert_eq!(paths, series);
        expected += paths;
    }
    assert!(expected > 0);
    let paths = get_json(&cp, "/api/v1/stats/paths?service=web&window=300&limit=1000").await;
    let items = paths["items"].as_array().unwrap();
    let counted: u64 = items.iter().map(|i| i["requests"].as_u64().unwrap()).sum();
    assert_eq!(counted, expected, "the control plane shows the same totals");
    let services = get_json(&cp, "/api/v1/stats/services?service=web&window=300").await;
    assert_eq!(
        item(&services, "service", "web")["requests"],
        u64::from(PATHS),
        "every request counted once"
    );
    assert!(items.iter().any(|i| i["path"] == "other"));
    assert!(items.len() <= 51 * 30, "{} path rows", items.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_has_denials_and_certificates_and_access_logs_switch_at_run_time() {
    let (_running, cp) = control("obs-audit", |c| {
        // Proxies report denials with their heartbeat (a third of this).
        c.heartbeat_ttl = Duration::from_secs(3);
    })
    .await;
    let app = trellis_test_support::http_server::spawn("payments-app").await;
    let join = cp.join_args("payments").await;
    let app_addr = app.addr.to_string();
    let mut args = vec!["--service", "payments", "--app", app_addr.as_str()];
    args.extend(join.iter().map(String::as_str));
    let payments = ProxyProcess::spawn(&proxy_bin(), &args).await;
    let (client, up) = caller(&cp, "payments", &[]).await;
    wait_endpoints(&client, "payments", 1).await;

    let mut c = Client::connect(up).await;
    assert_eq!(c.call("payments", "/before", &[]).await.status, 200);
    apply(
        &cp,
        "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: no-client}\nspec:\n  targetRef: {kind: Service, name: payments}\n  action: DENY\n  rules:\n  - from: [{services: [client]}]\n    to: [{paths: [\"/secret*\"]}]\n---\napiVersion: trellis.dev/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec:\n  accessLogServices: [payments]\n",
    )
    .await;
    let denied = eventually("the policy applies", Duration::from_secs(10), || async {
        let a = Client::connect(up)
            .await
            .call("payments", "/secret/1", &[])
            .await;
        (a.status == 403).then_some(a)
    })
    .await;
    assert!(denied.error.contains("denied"), "{denied:?}");

    let audit = eventually(
        "the denial reaches the audit log",
        Duration::from_secs(15),
        || async {
            let body = get_json(&cp, "/api/v1/audit?since=10m&action=denied").await;
            (!body["items"].as_array().unwrap().is_empty()).then_some(body)
        },
    )
    .await;
    let d = &audit["items"][0];
    assert_eq!(d["actor"], "spiffe://trellis.local/ns/default/svc/client");
    assert_eq!(d["new"]["path"], "/secret/1");
    assert_eq!(d["new"]["policy"], "default/no-client");
    let certs = get_json(&cp, "/api/v1/audit?since=10m&action=certificate-issued").await;
    let issued: Vec<&str> = certs["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["resource"].as_str().unwrap())
        .collect();
    assert!(
        issued.contains(&"spiffe://trellis.local/ns/default/svc/payments"),
        "{issued:?}"
    );
    let table = cli(&cp, &["get", "audit", "--since", "10m"]);
    assert!(
        table.contains("denied") && table.contains("certificate-issued"),
        "{table}"
    );
    assert!(table.contains("MeshConfig"), "config changes too: {table}");
    let (status, body) = http_call(cp.http, "GET", "/api/v1/audit?since=soon", "", None).await;
    assert_eq!(status, 400, "{body}");

    // Access logs: on for payments (its proxy writes JSON lines to stdout), off for client.
    eventually(
        "payments logs requests",
        Duration::from_secs(10),
        || async {
            let mut c = Client::connect(up).await;
            c.call("payments", "/logged", &[]).await;
            payments
                .output()
                .lines()
                .any(|l| l.contains("\"path\":\"/logged\"") && l.contains("\"kind\":\"http\""))
                .then_some(())
        },
    )
    .await;
    let (_, config) = http_call(client.bound.admin, "GET", "/config", "", None).await;
    assert!(
        config.contains("\"accessLog\": false"),
        "client stays quiet"
    );
}
